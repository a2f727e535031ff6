"""What every destination type shares: the config base, the outcome of a send, the registry.

A destination is one ``[[destinations]]`` table; its ``type`` picks the model that
validates it (:mod:`dicom_node.dispatch.destinations`: ``DicomDestination`` in
:mod:`~dicom_node.dispatch.dicom_config`, ``Hl7Destination`` in
:mod:`~dicom_node.dispatch.hl7_config`). Each model derives from
:class:`DestinationBase`, which holds the keys every type has::

    [[destinations]]
    name = "pacs"                  # referenced by [[rules]] destinations; unique
    type = "dicom"                 # "dicom" (C-STORE SCU, the default), "hl7" (MLLP) or
                                   # "dicomweb" (STOW-RS)
    timeout_s = 30                 # default for every timeout of the type
    connect_timeout_s = 5          # optional overrides: connect_timeout_s, network_timeout_s
    # … and the keys of the type; a key the type does not have is an error

Adding a destination kind (as ``dicomweb``, STOW-RS, was added) is adding a config model to
the union in :mod:`~dicom_node.dispatch.destinations` and one module that implements
:class:`TargetType` and calls :func:`register` — the pattern of mercure's target-type
registry. Failures are *returned* as :class:`SendOutcome`, never raised, so that the outbox
that calls a sender decides about retries from data, not from exceptions.

Nothing here imports pynetdicom or hl7apy: every CLI command validates a configuration.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from pydicom.dataset import Dataset

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
class SendOutcome:
    """Outcome of sending one object (or of one echo).

    ``retryable`` answers the outbox's one question: can the *same* request succeed
    later without changing the object? Network, association and resource failures can;
    a peer that says the data set is wrong for its SOP class will say so again.
    ``retry_after_s`` is the peer's own word on when to try again (an HTTP Retry-After),
    when it gave one: a retry should not come sooner.
    """

    success: bool
    status: int | None
    retryable: bool
    message: str
    category: Category
    warning: bool = False
    sop_instance_uid: str | None = None
    transfer_syntax: str | None = None
    retry_after_s: float | None = None

    @property
    def status_hex(self) -> str | None:
        return None if self.status is None else f"0x{self.status:04X}"


def failure(
    category: Category, message: str, retryable: bool, sop_instance_uid: str | None = None
) -> SendOutcome:
    """A failed send or check that got no status from the peer."""
    return SendOutcome(
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


def field_error(field: str, reason: str) -> PydanticCustomError:
    """A validation error about ``field`` of the model being validated, raised from a
    model validator: its message is ``"<field>: <reason>"``, and the configuration's
    error line (:func:`dicom_node.config.describe_error`) names ``<location>.<field>``."""
    return PydanticCustomError(
        "invalid_field", "{field}: {reason}", {"field": field, "reason": reason}
    )


Delivers = Literal["objects", "study_events"]


class DestinationBase(BaseModel):
    """The keys every ``[[destinations]]`` table has, whatever its ``type``.

    ``delivers`` says what a type is sent: ``"objects"`` (every output object of an
    image, e.g. C-STORE) or ``"study_events"`` (one message per finished study, e.g. an
    HL7 ORU^R01). Timeouts a type does not use are not keys of it; of the specific ones,
    connect and network are shared by every type so far.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    delivers: ClassVar[Delivers]

    name: str = Field(min_length=1)
    type: str
    timeout_s: float = Field(30.0, gt=0, description="Default for every timeout, seconds.")
    connect_timeout_s: float | None = Field(None, gt=0)
    network_timeout_s: float | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        name = value.strip()
        if not name or name == "*":
            raise ValueError("a destination name may not be blank or '*'")
        return name

    def timeout(self, which: Literal["network", "connect"]) -> float:
        """The specific timeout if configured, else ``timeout_s``."""
        return self._timeout(which)

    def _timeout(self, which: str) -> float:
        specific: float | None = getattr(self, f"{which}_timeout_s")
        return self.timeout_s if specific is None else specific

    def capped(self, seconds: float) -> Self:
        """A copy whose every timeout is at most ``seconds`` (quick reachability checks)."""
        names = [name for name in type(self).model_fields if name.endswith("_timeout_s")]
        return self.model_copy(
            update={
                name: min(self._timeout(name.removesuffix("_timeout_s")), seconds) for name in names
            }
        )

    @property
    def peer(self) -> str:
        """Where this destination is, for people: e.g. ``PACS@10.0.0.5:104``."""
        return self.name


class DestinationError(ValueError):
    """A ``[[destinations]]`` list that is invalid as a whole; ``key`` names the entry."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def check_unique_names(destinations: Sequence[DestinationBase]) -> None:
    """Destination names are keys (rules refer to them), so each may appear once."""
    seen: set[str] = set()
    for index, destination in enumerate(destinations):
        if destination.name in seen:
            raise DestinationError(
                f"destinations.{index}.name", f"destination {destination.name!r} is used twice"
            )
        seen.add(destination.name)


Sendable = Dataset | str | Path


DestinationT = TypeVar("DestinationT", bound=DestinationBase, contravariant=True)


class TargetType(Protocol[DestinationT]):
    """What a destination type implements; one module per type registers one of these."""

    def send(
        self, destination: DestinationT, items: Iterable[Sendable], our_ae_title: str
    ) -> list[SendOutcome]:
        """Send every item; one result per item, in order; never raises on I/O errors."""
        ...

    def check(self, destination: DestinationT, our_ae_title: str) -> SendOutcome:
        """Is the destination reachable and willing (e.g. C-ECHO)?"""
        ...


_REGISTRY: dict[str, TargetType[Any]] = {}

# Built-in types and the module that registers each one's sender when first asked for
# it, so that validating a configuration imports neither pynetdicom, hl7apy nor httpx.
_BUILTIN: dict[str, str] = {
    "dicom": "dicom_node.dispatch.dicom",
    "hl7": "dicom_node.dispatch.hl7",
    "dicomweb": "dicom_node.dispatch.dicomweb",
}


def register(type_name: str, target: TargetType[Any]) -> TargetType[Any]:
    """Make ``target`` the implementation of ``type = "<type_name>"`` destinations."""
    _REGISTRY[type_name] = target
    return target


def get_sender(type_name: str) -> TargetType[Any]:
    """The implementation for a destination type; ``KeyError`` names the known ones."""
    if type_name not in _REGISTRY and type_name in _BUILTIN:
        importlib.import_module(_BUILTIN[type_name])
    try:
        return _REGISTRY[type_name]
    except KeyError:
        known = ", ".join(registered_types()) or "none"
        raise KeyError(f"unknown destination type {type_name!r} (known: {known})") from None


def registered_types() -> tuple[str, ...]:
    """Types that have (or will load) a sender."""
    return tuple(sorted(set(_REGISTRY) | set(_BUILTIN)))
