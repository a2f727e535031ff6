"""The ``type = "dicom"`` destination's configuration: a C-STORE SCU peer (PS3.4 Annex B).

::

    [[destinations]]
    name = "pacs"                  # referenced by [[rules]] destinations
    type = "dicom"                 # the default when type is omitted
    ae_title = "PACS"              # Called AE Title of the peer
    host = "10.0.0.5"
    port = 104
    calling_ae_title = "CXR_AI_OUT"  # optional; default is our node's AE title
    timeout_s = 30                 # default for every timeout below
    # acse_timeout_s / dimse_timeout_s / network_timeout_s / connect_timeout_s: overrides
    # [destinations.tls]: DICOM TLS (PS3.15 Annex B), see TlsOptions

Kept apart from :mod:`dicom_node.dispatch.dicom` (the sender) so that validating a
configuration does not import pynetdicom.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dicom_node.dispatch.base import Delivers, DestinationBase, field_error, validate_ae_title
from dicom_node.tls import ClientContext, KeyMaterialError, check_key_material, client_context


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
        if self.cert_file is not None and self.key_file is None:
            raise field_error("key_file", "required with cert_file (give both or neither)")
        if self.key_file is not None and self.cert_file is None:
            raise field_error("cert_file", "required with key_file (give both or neither)")
        files = {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file}
        blame = "ca_file" if self.key_file is None else "key_file"
        try:
            check_key_material(files, self.context, blame)
        except KeyMaterialError as exc:
            raise field_error(exc.key, exc.reason) from None
        return self

    def context(self) -> ClientContext:
        """A fresh client context from the files (raises ``ssl.SSLError``/``OSError``)."""
        return client_context(self.ca_file, self.cert_file, self.key_file)


class DicomDestination(DestinationBase):
    """One ``type = "dicom"`` table: every output object is C-STOREd to the peer."""

    delivers: ClassVar[Delivers] = "objects"

    type: Literal["dicom"] = "dicom"
    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = None
    acse_timeout_s: float | None = Field(None, gt=0)
    dimse_timeout_s: float | None = Field(None, gt=0)
    tls: TlsOptions = Field(default_factory=TlsOptions)

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _check_ae_title(cls, value: str | None) -> str | None:
        return None if value is None else validate_ae_title(value)

    def timeout(self, which: Literal["acse", "dimse", "network", "connect"]) -> float:
        """The specific timeout if configured, else ``timeout_s``."""
        return self._timeout(which)

    @property
    def peer(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"
