"""The registry of output types: which DICOM objects the node can write for an image.

One module per output type (``dicom_node/results/<module>.py``) declares an
:class:`OutputType` — its name, the SOP class it writes, what it needs from the analysis,
and one builder — and calls :func:`register`. Which outputs an image gets is configuration
(``outputs = ["sr", "sc"]`` on a rule), checked against :func:`output_names` when the
configuration is loaded; the pipeline then builds and sends *outputs × destinations*
without naming any of them. Adding an output type is adding one module here, one line in
``_BUILTIN`` and its tests — the pattern of the destination types in
:mod:`dicom_node.dispatch.base` (and of mercure's target types).

Built-in types are named here with their module and imported on first use, so that
validating a configuration (every CLI command does) does not import highdicom.
"""

from __future__ import annotations

import datetime
import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from dicom_node.results.common import Equipment
    from inference.cascade import ImageResult

Need = Literal["overlay", "cam", "mask", "priority"]
"""What a builder may need beyond the source and the findings:

* ``overlay`` — the rendered heatmap (none when Grad-CAM is switched off);
* ``cam`` — the Grad-CAM map itself and the source's grid (``ImageResult.cam`` and
  ``image_shape``; none when Grad-CAM is switched off);
* ``mask`` — the anatomy segmentation (``ImageResult.masks``; none when not assessed);
* ``priority`` — the study's priority level *after* this image's result counts, which is
  only known under the study lock: such outputs are built inside the pipeline's
  transaction, the others before it.
"""

DEFAULT_OUTPUTS: tuple[str, ...] = ("sr", "sc", "seg")
"""What a rule without ``outputs`` writes: the SR, the heatmap SC when there is one, and
the anatomy SEG when the anatomy was assessed (adults)."""

# name -> module that registers it on import
_BUILTIN: dict[str, str] = {
    "sr": "dicom_node.results.sr",
    "sc": "dicom_node.results.heatmap_sc",
    "pm": "dicom_node.results.parametric_map",  # off by default: rules ask for it
    "seg": "dicom_node.results.seg",
}


@dataclass(frozen=True)
class BuildInputs:
    """Everything a builder may use; the same inputs must give the same object."""

    source: Dataset
    result: ImageResult
    equipment: Equipment
    content_datetime: datetime.datetime  # pinned to the job: re-runs are byte-identical
    source_variant: str | None  # a changed source re-sent under its old UID
    priority: str | None = None  # the study's level; set only for types that need it
    # Every output type written for this image: an SR references the SEG's segments only
    # when the SEG is among them (no reference to an object that does not exist).
    companions: frozenset[str] = frozenset()


@dataclass(frozen=True)
class OutputType:
    """One kind of output object and how to build it."""

    name: str
    sop_class_uid: str
    build: Callable[[BuildInputs], Dataset]
    needs: frozenset[Need] = frozenset()
    description: str = ""

    def applies_to(self, result: ImageResult) -> bool:
        """Whether ``result`` has what this type needs (no overlay → no heatmap SC)."""
        if "overlay" in self.needs and result.overlay is None:
            return False
        if "cam" in self.needs and (result.cam is None or result.image_shape is None):
            return False
        return not ("mask" in self.needs and result.masks is None)

    @property
    def needs_priority(self) -> bool:
        return "priority" in self.needs


_REGISTRY: dict[str, OutputType] = {}


def register(output_type: OutputType) -> OutputType:
    """Make ``output_type`` available under its name (called by its module on import)."""
    _REGISTRY[output_type.name] = output_type
    return output_type


def get_output_type(name: str) -> OutputType:
    """The registered type called ``name``; ``KeyError`` naming the known ones."""
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(output_names())
        raise KeyError(f"unknown output type {name!r} (known: {known})") from None


def output_types(names: Sequence[str]) -> list[OutputType]:
    """The types called ``names``, in order."""
    return [get_output_type(name) for name in names]


def output_names() -> tuple[str, ...]:
    """Every output type a rule may name."""
    return tuple(sorted(set(_BUILTIN) | set(_REGISTRY)))


def check_output_names(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` without duplicates, in order; ``ValueError`` naming an unknown one."""
    unique = tuple(dict.fromkeys(name.strip() for name in names))
    known = output_names()
    for name in unique:
        if name not in known:
            raise ValueError(f"unknown output type {name!r} (known: {', '.join(known)})")
    return unique
