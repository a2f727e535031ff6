"""The registry of output types: which DICOM objects the node can write for an image.

One module per output type (``dicom_node/results/<module>.py``) declares an
:class:`OutputType` — its name, the SOP class it writes, what it needs from the analysis,
and one builder — and calls :func:`register`. Which outputs an image gets is configuration
(``outputs = ["sr", "sc"]`` on a rule), checked against :func:`output_names` when the
configuration is loaded; the pipeline then builds and sends *outputs × destinations*
without naming any of them. Adding an output type is adding one module here, one line in
``_BUILTIN`` and its tests — the pattern of the destination types in
:mod:`dicom_node.dispatch.base`.

Built-in types are named here with their module and imported on first use, so that
validating a configuration (every CLI command does) does not import highdicom.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

DEFAULT_OUTPUTS: tuple[str, ...] = ("sr", "sc")
"""What a rule without ``outputs`` writes: the SR, and the heatmap SC when there is one."""

# name -> module that registers it on import
_BUILTIN: dict[str, str] = {
    "sr": "dicom_node.results.sr",
    "sc": "dicom_node.results.heatmap_sc",
}


def output_names() -> tuple[str, ...]:
    """Every output type a rule may name."""
    return tuple(sorted(_BUILTIN))


def check_output_names(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` without duplicates, in order; ``ValueError`` naming an unknown one."""
    unique = tuple(dict.fromkeys(name.strip() for name in names))
    known = output_names()
    for name in unique:
        if name not in known:
            raise ValueError(f"unknown output type {name!r} (known: {', '.join(known)})")
    return unique


def _load(name: str) -> None:
    importlib.import_module(_BUILTIN[name])
