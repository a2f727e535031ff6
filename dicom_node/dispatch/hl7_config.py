"""The ``type = "hl7"`` destination's configuration: an MLLP receiver (RIS, worklist).

::

    [[destinations]]
    name = "ris"
    type = "hl7"
    host = "10.0.0.7"
    port = 2575
    receiving_application = "RIS"    # MSH-5, optional
    receiving_facility = "RADIOLOGY" # MSH-6, optional
    sending_facility = "HOSPITAL"    # MSH-4, optional
    timeout_s = 30                   # connect_timeout_s / network_timeout_s override it

Kept apart from :mod:`dicom_node.dispatch.hl7` (the sender) so that validating a
configuration does not import hl7apy.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from dicom_node.dispatch.base import Delivers, DestinationBase


class Hl7Destination(DestinationBase):
    """One ``type = "hl7"`` table: one ORU^R01 per finished study, over MLLP."""

    delivers: ClassVar[Delivers] = "study_events"

    type: Literal["hl7"] = "hl7"
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    sending_facility: str | None = Field(None, description="MSH-4.")
    receiving_application: str | None = Field(None, description="MSH-5.")
    receiving_facility: str | None = Field(None, description="MSH-6.")

    @property
    def peer(self) -> str:
        return f"{self.host}:{self.port}"
