"""``Destination``: one ``[[destinations]]`` table, validated by the model of its ``type``.

A pydantic discriminated union on ``type``: each type's model validates its own keys (a
key another type has is an unknown key here), and ``type`` may be omitted for the
default, ``"dicom"``. Only configuration models are imported here, never a sender.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, TypeAdapter

from dicom_node.dispatch.base import DestinationBase, field_error
from dicom_node.dispatch.dicom_config import DicomDestination
from dicom_node.dispatch.dicomweb_config import DicomwebDestination
from dicom_node.dispatch.hl7_config import Hl7Destination

DEFAULT_TYPE = "dicom"

DESTINATION_MODELS: Mapping[str, type[DestinationBase]] = {
    "dicom": DicomDestination,
    "hl7": Hl7Destination,
    "dicomweb": DicomwebDestination,
}


def destination_types() -> tuple[str, ...]:
    """The ``type`` values a ``[[destinations]]`` table may have."""
    return tuple(DESTINATION_MODELS)


def _with_type(value: object) -> object:
    """Fill in the default type; name ``type`` when it is not one of ours."""
    if not isinstance(value, Mapping):
        return value  # a model instance already
    kind = value.get("type", DEFAULT_TYPE)
    if not isinstance(kind, str) or kind not in DESTINATION_MODELS:
        known = ", ".join(DESTINATION_MODELS)
        raise field_error("type", f"unknown destination type {kind!r} (known: {known})")
    return {**value, "type": kind}


Destination = Annotated[
    DicomDestination | Hl7Destination | DicomwebDestination,
    Field(discriminator="type"),
    BeforeValidator(_with_type),
]
"""Any destination; ``list[Destination]`` validates a ``[[destinations]]`` array."""


@cache
def _adapter() -> TypeAdapter[Destination]:
    return TypeAdapter(Destination)


def parse_destination(table: Mapping[str, Any]) -> Destination:
    """Validate one ``[[destinations]]`` table (``pydantic.ValidationError`` if invalid)."""
    return _adapter().validate_python(table)
