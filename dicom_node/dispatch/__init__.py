"""Sending results to destinations: one module per destination (target) type.

The built-in types ("dicom", "hl7") are imported on first use by ``get_sender``, so
that loading a configuration does not pay for pynetdicom and hl7apy. The outbox
(dicom_node/sender.py) calls these senders; they keep no state of their own.
"""

from dicom_node.dispatch.base import (
    Destination,
    SendResult,
    TargetType,
    check_unique_names,
    get_sender,
    register,
    registered_types,
    required_fields,
)

__all__ = [
    "Destination",
    "SendResult",
    "TargetType",
    "check_unique_names",
    "get_sender",
    "register",
    "registered_types",
    "required_fields",
]
