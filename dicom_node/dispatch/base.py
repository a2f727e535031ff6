"""Destinations, the outcome of a send, and the registry of destination (target) types.

A destination is one ``[[destinations]]`` table::

    [[destinations]]
    name = "pacs"                  # referenced by [[rules]] destinations
    type = "dicom"                 # target type; "dicom" (C-STORE SCU) is the default
    ae_title = "PACS"              # Called AE Title of the peer
    host = "10.0.0.5"
    port = 104
    calling_ae_title = "CXR_AI_OUT"  # optional; default is our node's AE title
    timeout_s = 30                 # default for every timeout below
    # acse_timeout_s / dimse_timeout_s / network_timeout_s / connect_timeout_s: overrides
    # [destinations.tls]: DICOM TLS (PS3.15 Annex B), see TlsOptions

Adding a destination kind (HL7 MLLP, DICOMweb STOW-RS…) is adding one module that
implements :class:`TargetType` and calls :func:`register` — the pattern of mercure's
target-type registry. Failures are *returned* as :class:`SendResult`, never raised, so that
the outbox that calls a sender decides about retries from data, not from exceptions.
"""

from __future__ import annotations

import importlib
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom.dataset import Dataset

from dicom_node.tls import ClientContext, client_context, describe_error, readable_file

DEFAULT_TYPE = "dicom"

Category = Literal[
    "success",  # stored / echoed (possibly with a warning status)
    "connection",  # no TCP connection: refused, unreachable, connect timeout
    "rejected",  # A-ASSOCIATE-RJ (PS3.8 §7.1.1.9)
    "aborted",  # A-ABORT / A-P-ABORT, or the connection dropped mid-association
    "timeout",  # no ACSE or DIMSE response within the configured time
    "no_context",  # the peer accepted no presentation context usable for this object
    "status",  # the peer answered with a failure status (PS3.7 Annex C)
    "invalid_input",  # the object itself cannot be read, encoded or converted
]


@dataclass(frozen=True)
class SendResult:
    """Outcome of sending one object (or of one echo).

    ``retryable`` answers the outbox's one question: can the *same* request succeed
    later without changing the object? Network, association and resource failures can;
    a peer that says the data set is wrong for its SOP class will say so again.
    """

    success: bool
    status: int | None
    retryable: bool
    message: str
    category: Category
    warning: bool = False
    sop_instance_uid: str | None = None
    transfer_syntax: str | None = None

    @property
    def status_hex(self) -> str | None:
        return None if self.status is None else f"0x{self.status:04X}"


def failure(
    category: Category, message: str, retryable: bool, sop_instance_uid: str | None = None
) -> SendResult:
    """A failed send or check that got no status from the peer."""
    return SendResult(
        success=False,
        status=None,
        retryable=retryable,
        message=message,
        category=category,
        sop_instance_uid=sop_instance_uid,
    )


def validate_ae_title(value: str) -> str:
    """AE title per PS3.5 Table 6.2-1: 1-16 characters, no backslash or control characters.

    Leading and trailing spaces are not significant and are stripped.
    """
    title = value.strip(" ")
    if not 1 <= len(title) <= 16:
        raise ValueError("an AE title must be 1 to 16 characters")
    if any(ch == "\\" or not " " <= ch <= "~" for ch in title):
        raise ValueError("an AE title may not contain backslash or control characters")
    return title


class TlsOptions(BaseModel):
    """``[destinations.tls]``: DICOM TLS (PS3.15 Annex B) to this destination.

    The peer's certificate is verified against ``ca_file`` (default: the system's trust
    store) and must name ``server_name`` (default: ``host``); ``cert_file`` and
    ``key_file`` are our client certificate, for peers that require one. Files are
    checked when the configuration is loaded and read again for every association, so
    renewed certificates are picked up without a restart.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _usable(self) -> TlsOptions:
        if not self.enabled:
            return self
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file, key_file: give both or neither")
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            if path is not None:
                try:
                    readable_file(path)
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from None
        try:
            self.context()
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"cannot load certificate, key or CA: {describe_error(exc)}") from None
        return self

    def context(self) -> ClientContext:
        """A fresh client context from the files (raises ``ssl.SSLError``/``OSError``)."""
        return client_context(self.ca_file, self.cert_file, self.key_file)


class Destination(BaseModel):
    """One ``[[destinations]]`` table; which fields are required depends on ``type``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    type: str = DEFAULT_TYPE
    ae_title: str | None = None
    host: str | None = Field(None, min_length=1)
    port: int | None = Field(None, ge=1, le=65535)
    calling_ae_title: str | None = None
    # type = "hl7": MSH-4 sending facility, MSH-5/MSH-6 receiving application/facility
    sending_facility: str | None = None
    receiving_application: str | None = None
    receiving_facility: str | None = None
    timeout_s: float = Field(30.0, gt=0, description="Default for every timeout, seconds.")
    acse_timeout_s: float | None = Field(None, gt=0)
    dimse_timeout_s: float | None = Field(None, gt=0)
    network_timeout_s: float | None = Field(None, gt=0)
    connect_timeout_s: float | None = Field(None, gt=0)
    tls: TlsOptions = Field(default_factory=TlsOptions)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        name = value.strip()
        if not name or name == "*":
            raise ValueError("a destination name may not be blank or '*'")
        return name

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _check_ae_title(cls, value: str | None) -> str | None:
        return None if value is None else validate_ae_title(value)

    @model_validator(mode="after")
    def _check_type(self) -> Destination:
        required = required_fields(self.type)
        if required is None:
            known = ", ".join(registered_types()) or "none"
            raise ValueError(f"type: unknown destination type {self.type!r} (known: {known})")
        missing = [field for field in required if getattr(self, field) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)}: required for type {self.type!r}")
        return self

    def timeout(self, which: Literal["acse", "dimse", "network", "connect"]) -> float:
        """The specific timeout if configured, else ``timeout_s``."""
        specific: float | None = getattr(self, f"{which}_timeout_s")
        return self.timeout_s if specific is None else specific


def check_unique_names(destinations: Sequence[Destination]) -> Sequence[Destination]:
    """Destination names are keys (rules refer to them), so each may appear once."""
    seen: set[str] = set()
    for index, destination in enumerate(destinations):
        if destination.name in seen:
            raise ValueError(f"destinations.{index}.name: {destination.name!r} is used twice")
        seen.add(destination.name)
    return destinations


Sendable = Dataset | str | Path


class TargetType(Protocol):
    """What a destination type implements; one module per type registers one of these."""

    required_fields: tuple[str, ...]

    def send(
        self, destination: Destination, items: Iterable[Sendable], our_ae_title: str
    ) -> list[SendResult]:
        """Send every item; one result per item, in order; never raises on I/O errors."""
        ...

    def check(self, destination: Destination, our_ae_title: str) -> SendResult:
        """Is the destination reachable and willing (e.g. C-ECHO)?"""
        ...


_REGISTRY: dict[str, TargetType] = {}

# Built-in types: module and required fields, so that validating a configuration does not
# import pynetdicom or hl7apy (every CLI command validates one); the module registers its
# implementation when first asked for a sender.
_BUILTIN: dict[str, tuple[str, tuple[str, ...]]] = {
    "dicom": ("dicom_node.dispatch.dicom", ("ae_title", "host", "port")),
    "hl7": ("dicom_node.dispatch.hl7", ("host", "port")),
}


def register(type_name: str, target: TargetType) -> TargetType:
    """Make ``target`` the implementation of ``type = "<type_name>"`` destinations."""
    _REGISTRY[type_name] = target
    return target


def get_sender(type_name: str) -> TargetType:
    """The implementation for a destination type; ``KeyError`` names the known ones."""
    if type_name not in _REGISTRY and type_name in _BUILTIN:
        importlib.import_module(_BUILTIN[type_name][0])
    try:
        return _REGISTRY[type_name]
    except KeyError:
        known = ", ".join(registered_types()) or "none"
        raise KeyError(f"unknown destination type {type_name!r} (known: {known})") from None


def required_fields(type_name: str) -> tuple[str, ...] | None:
    """Fields a destination of this type must set; None for an unknown type."""
    if type_name in _REGISTRY:
        return _REGISTRY[type_name].required_fields
    builtin = _BUILTIN.get(type_name)
    return None if builtin is None else builtin[1]


def registered_types() -> tuple[str, ...]:
    return tuple(sorted(set(_REGISTRY) | set(_BUILTIN)))
