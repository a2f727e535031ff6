"""Sending results to destinations: one module per destination (target) type.

Each type has a configuration model in a light module (``dicom_config``, ``hl7_config``,
``dicomweb_config``; the :data:`Destination` union picks one by ``type``) and a sender
module (``dicom``, ``hl7``, ``dicomweb``) that ``get_sender`` imports on first use, so
that loading a configuration does not pay for pynetdicom, hl7apy and httpx. The outbox
(dicom_node/sender.py) calls these senders; they keep no state of their own.
"""

from dicom_node.dispatch.base import (
    Delivers,
    DestinationBase,
    DestinationError,
    SendOutcome,
    TargetType,
    check_unique_names,
    get_sender,
    register,
    registered_types,
)
from dicom_node.dispatch.destinations import (
    DEFAULT_TYPE,
    Destination,
    destination_types,
    parse_destination,
)
from dicom_node.dispatch.dicom_config import DicomDestination, TlsOptions
from dicom_node.dispatch.dicomweb_config import DicomwebAuth, DicomwebDestination
from dicom_node.dispatch.hl7_config import Hl7Destination

__all__ = [
    "DEFAULT_TYPE",
    "Delivers",
    "Destination",
    "DestinationBase",
    "DestinationError",
    "DicomDestination",
    "DicomwebAuth",
    "DicomwebDestination",
    "Hl7Destination",
    "SendOutcome",
    "TargetType",
    "TlsOptions",
    "check_unique_names",
    "destination_types",
    "get_sender",
    "parse_destination",
    "register",
    "registered_types",
]
