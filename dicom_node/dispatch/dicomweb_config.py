"""The ``type = "dicomweb"`` destination's configuration: a STOW-RS service (PS3.18 10.5).

::

    [[destinations]]
    name = "archive"
    type = "dicomweb"
    url = "https://pacs.example.org/dicom-web"   # the service root; objects go to /studies
    batch_size = 50               # objects per request (one multipart body)
    ca_file = "/etc/cxr-node/pacs-ca.pem"        # optional; default: the system's CAs
    timeout_s = 30                # connect_timeout_s / network_timeout_s override it
    retry_after_max_wait_s = 5    # wait for a 429/503 Retry-After up to this, then retry

    [destinations.auth]           # optional; default: no authentication
    type = "bearer"               # "bearer" or "basic"
    token_file = "/run/secrets/pacs-token"       # or token_env = "PACS_TOKEN"
    # basic: username = "cxr-node" and password_file = … or password_env = "…"

Secrets are never written in the configuration: a token or password is named by the
file or the environment variable that holds it, checked when the configuration is
loaded (the file is readable, the variable set and not empty), and read again for every
send, so a rotated token is picked up without a restart. A key that would carry a secret
inline (``token``, ``password``) is an unknown key, hence an error.

Kept apart from :mod:`dicom_node.dispatch.dicomweb` (the sender) so that validating a
configuration does not import httpx.
"""

from __future__ import annotations

import base64
import os
import ssl
from pathlib import Path
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dicom_node.dispatch.base import Delivers, DestinationBase, field_error

AuthType = Literal["none", "bearer", "basic"]


class SecretError(ValueError):
    """A configured secret cannot be read (``key`` names the setting)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def read_secret(file: Path | None, env: str | None, key: str) -> str:
    """The secret in ``file`` (surrounding whitespace stripped) or in variable ``env``."""
    if file is not None:
        try:
            value = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SecretError(f"{key}_file", f"cannot read {file}: {type(exc).__name__}") from None
        if not value:
            raise SecretError(f"{key}_file", f"{file} is empty")
        return value
    if env is not None:
        value = os.environ.get(env, "").strip()
        if not value:
            raise SecretError(f"{key}_env", f"environment variable {env} is not set or empty")
        return value
    raise SecretError(f"{key}_file", f"give {key}_file or {key}_env")


class DicomwebAuth(BaseModel):
    """``[destinations.auth]``: how the node authenticates to the STOW-RS service."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: AuthType = "none"
    token_file: Path | None = None
    token_env: str | None = Field(None, min_length=1)
    username: str | None = Field(None, min_length=1)
    password_file: Path | None = None
    password_env: str | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: object) -> object:
        """A secret written into the file is refused without being echoed in the error."""
        if isinstance(data, dict):
            for key in ("token", "password"):
                if key in data:
                    raise field_error(
                        key,
                        f"secrets are not written in the configuration: use {key}_file "
                        f"or {key}_env",
                    )
        return data

    @model_validator(mode="after")
    def _complete(self) -> DicomwebAuth:
        wanted = {
            "none": set(),
            "bearer": {"token"},
            "basic": {"password", "username"},
        }[self.type]
        given = {
            "token": self.token_file is not None or self.token_env is not None,
            "password": self.password_file is not None or self.password_env is not None,
            "username": self.username is not None,
        }
        for what, present in given.items():
            key = what if what == "username" else f"{what}_file"
            if present and what not in wanted:
                raise field_error(key, f"not used with auth type {self.type!r}")
            if not present and what in wanted:
                raise field_error(key, f"required with auth type {self.type!r}")
        for secret in wanted - {"username"}:
            if getattr(self, f"{secret}_file") and getattr(self, f"{secret}_env"):
                raise field_error(f"{secret}_env", f"give {secret}_file or {secret}_env, not both")
            try:
                read_secret(getattr(self, f"{secret}_file"), getattr(self, f"{secret}_env"), secret)
            except SecretError as exc:
                raise field_error(exc.key, exc.reason) from None
        return self

    def header(self) -> str | None:
        """The Authorization header value, read from the secret's source now."""
        if self.type == "bearer":
            return f"Bearer {read_secret(self.token_file, self.token_env, 'token')}"
        if self.type == "basic":
            password = read_secret(self.password_file, self.password_env, "password")
            pair = f"{self.username}:{password}".encode()
            return f"Basic {base64.b64encode(pair).decode('ascii')}"
        return None


class DicomwebDestination(DestinationBase):
    """One ``type = "dicomweb"`` table: every output object is stored with STOW-RS."""

    delivers: ClassVar[Delivers] = "objects"

    type: Literal["dicomweb"] = "dicomweb"
    url: str = Field(min_length=1, description="DICOMweb service root, without /studies.")
    auth: DicomwebAuth = Field(default_factory=DicomwebAuth)
    ca_file: Path | None = None
    batch_size: int = Field(50, ge=1, le=1000)
    retry_after_max_wait_s: float = Field(5.0, ge=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        url = value.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials do not belong in the URL: use [destinations.auth]")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return url

    @model_validator(mode="after")
    def _check_ca_file(self) -> DicomwebDestination:
        if self.ca_file is not None:
            try:
                self.ssl_context()
            except (OSError, ssl.SSLError) as exc:
                raise field_error("ca_file", f"cannot load {self.ca_file}: {exc}") from None
        return self

    def ssl_context(self) -> ssl.SSLContext:
        """Verification against ``ca_file``, else the system's trust store."""
        return ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file is not None else None
        )

    @property
    def stow_url(self) -> str:
        """STOW-RS "Store Instances" resource (PS3.18 10.5.1): ``{root}/studies``."""
        return f"{self.url}/studies"

    @property
    def peer(self) -> str:
        return self.url
