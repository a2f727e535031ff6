"""The network edge and orchestration of the chest-radiograph AI node.

receive → spool → job → route → infer → write results → send → notify: this package
owns the DICOM listener, the CLI and (later) workers, routing and dispatch; ``storage``
and ``inference`` underneath it never import it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cxr-ai-node")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
