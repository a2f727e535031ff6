"""``dicom-node``: the command line (Typer + Rich).

Commands are grouped the way operators think about them: ``serve`` (and ``worker``) runs
the node, ``status`` looks at it, ``db …`` and ``config …`` manage what it runs on,
``rules test`` explains routing, ``sends …`` and ``jobs …`` show and re-queue the outbox
and the queue, ``analyze`` runs the engine offline. Each group lives in its own module
here, built on the helpers of :mod:`dicom_node.cli.common`; :mod:`dicom_node.cli.app`
only assembles them into the root ``app``. A new command goes into its group's module
(or a new one) and is added in ``app.py``; every command takes ``--config`` and loads
settings through :func:`~dicom_node.cli.common.load_or_exit`.

Conventions: exit code 2 is "your configuration (or command line) is wrong", with one
line on stderr saying which key and why; machine-readable output (``--json``) goes to
stdout and nothing else does; logs go to stderr.
"""

from dicom_node.cli.app import app

__all__ = ["app"]
