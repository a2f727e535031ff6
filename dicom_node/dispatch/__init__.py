"""Sending results to destinations: one module per destination (target) type.

Importing the package registers the built-in types, so ``get_sender("dicom")`` works
after ``import dicom_node.dispatch``. A future outbox (persistent queue, retries) calls
these senders; they keep no state of their own.
"""

from dicom_node.dispatch import dicom, hl7
from dicom_node.dispatch.base import (
    Destination,
    SendResult,
    TargetType,
    check_unique_names,
    get_sender,
    register,
    registered_types,
)

__all__ = [
    "Destination",
    "SendResult",
    "TargetType",
    "check_unique_names",
    "dicom",
    "get_sender",
    "hl7",
    "register",
    "registered_types",
]
