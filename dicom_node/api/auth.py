"""The API's bearer token: where it comes from, and the check on every request.

There is never an open API: the token is, in this order,

1. ``DICOM_NODE_API_TOKEN`` (for containers and secret managers);
2. the first line of ``[http] token_file``;
3. ``<home>/api-token``, generated with :func:`secrets.token_urlsafe` at the first start
   (mode 0600) and reused on later starts, so that scrapers and bookmarks keep working
   across restarts.

The log says which of these is in force and where the file is, never the token. Requests
are compared in constant time; a missing or wrong token is 401 with
``WWW-Authenticate: Bearer``.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import HTTPException, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dicom_node.config import Settings
from dicom_node.logs import get_logger

log = get_logger(__name__)

TOKEN_ENV = "DICOM_NODE_API_TOKEN"
TOKEN_FILE_NAME = "api-token"
TOKEN_BYTES = 32
MIN_TOKEN_LENGTH = 16

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description=f"The node's API token ({TOKEN_ENV}, [http] token_file or <home>/api-token).",
)


class TokenError(OSError):
    """The configured token cannot be used; the message is one line for the operator."""


@dataclass(frozen=True)
class ApiToken:
    """The token in force and, for the log, where it came from (never the value)."""

    value: str = ""
    source: str = ""
    path: Path | None = None

    def __repr__(self) -> str:  # keep the value out of tracebacks and debug output
        return f"ApiToken(source={self.source!r}, path={self.path!r})"


def resolve_token(settings: Settings, environ: Mapping[str, str] | None = None) -> ApiToken:
    """The token of this node: environment, configured file, or the generated file."""
    environ = os.environ if environ is None else environ
    from_env = environ.get(TOKEN_ENV, "").strip()
    if from_env:
        token = ApiToken(_checked(from_env, TOKEN_ENV), f"environment variable {TOKEN_ENV}")
    elif settings.http.token_file is not None:
        path = settings.http.token_file
        try:
            token = ApiToken(_read(path), "token file", path)
        except FileNotFoundError:
            raise TokenError(f"api token file {path}: not found") from None
    else:
        token = _generated(settings.storage.home / TOKEN_FILE_NAME)
    log.info("api token in force", source=token.source, path=str(token.path or "") or None)
    return token


def _generated(path: Path) -> ApiToken:
    """Reuse ``<home>/api-token``, or create it (0600, exclusively: two starts agree)."""
    try:
        return ApiToken(_read(path), "generated file", path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process was faster: use its token
        return ApiToken(_read(path), "generated file", path)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(value + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    log.info("api token generated", path=str(path))
    return ApiToken(value, "generated file", path)


def _read(path: Path) -> str:
    """First line of a token file; warns when others may read it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise TokenError(f"api token file {path}: cannot read ({exc.strerror})") from None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("api token file is readable by others", path=str(path), mode=oct(mode))
    lines = text.strip().splitlines()
    return _checked(lines[0].strip() if lines else "", f"api token file {path}")


def _checked(value: str, source: str) -> str:
    if len(value) < MIN_TOKEN_LENGTH:
        raise TokenError(f"{source}: the api token must be at least {MIN_TOKEN_LENGTH} characters")
    return value


Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


class RequireToken:
    """FastAPI dependency: the request must carry ``Authorization: Bearer <token>``."""

    def __init__(self, token: ApiToken) -> None:
        self._expected = token.value.encode()

    def __call__(self, credentials: Credentials) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not secrets.compare_digest(given, self._expected):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="missing or invalid bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
