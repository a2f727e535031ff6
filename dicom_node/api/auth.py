"""The API's bearer tokens, their roles, and the check on every request.

Two roles; every route declares the one it needs through the router it is on
(:mod:`dicom_node.api.app`):

* ``viewer`` — reads: worklist, studies, heatmaps, metrics, status;
* ``admin`` — everything a viewer may, plus every action (job retries, and any route not
  declared a read).

There is never an open API. The **admin** token is, in this order,

1. ``DICOM_NODE_API_TOKEN`` (for containers and secret managers);
2. the first line of ``[http] token_file``;
3. ``<home>/api-token``, generated with :func:`secrets.token_urlsafe` at the first start
   (mode 0600) and reused on later starts, so that scrapers and bookmarks keep working
   across restarts.

The **viewer** token is optional: ``DICOM_NODE_API_VIEWER_TOKEN``, else the first line of
``[http] viewer_token_file``; without either, only the admin token opens the API.

The log says which of these is in force and where the file is, never a token; audit
events name a token by its fingerprint (:attr:`ApiToken.fingerprint`). Requests are
compared in constant time against every token; a missing or wrong token is 401 with
``WWW-Authenticate: Bearer``, a known token without the route's role 403. A client
address with ``[http] auth_failure_limit`` failures within ``auth_failure_window_s`` is
answered 429 with ``Retry-After`` until the oldest of them leaves the window (memory is
bounded: at most :data:`MAX_TRACKED_CLIENTS` addresses are remembered).
"""

from __future__ import annotations

import enum
import hashlib
import math
import os
import secrets
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dicom_node.config import Settings
from dicom_node.logs import get_logger

log = get_logger(__name__)

TOKEN_ENV = "DICOM_NODE_API_TOKEN"
VIEWER_TOKEN_ENV = "DICOM_NODE_API_VIEWER_TOKEN"
TOKEN_FILE_NAME = "api-token"
TOKEN_BYTES = 32
MIN_TOKEN_LENGTH = 16
FINGERPRINT_HEX = 12
MAX_TRACKED_CLIENTS = 4096

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description=(
        f"An API token: admin ({TOKEN_ENV}, [http] token_file or <home>/api-token) or "
        f"viewer ({VIEWER_TOKEN_ENV} or [http] viewer_token_file)."
    ),
)


class Role(enum.StrEnum):
    """What a token may do; a higher role includes the lower ones."""

    VIEWER = "viewer"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANK = {Role.VIEWER: 1, Role.ADMIN: 2}


class TokenError(OSError):
    """The configured token cannot be used; the message is one line for the operator."""


def fingerprint(value: str) -> str:
    """What audit events and logs call a token: the first hex digits of its SHA-256."""
    return hashlib.sha256(value.encode()).hexdigest()[:FINGERPRINT_HEX]


@dataclass(frozen=True)
class ApiToken:
    """A token in force, its role and, for the log, where it came from (never the value)."""

    value: str = ""
    source: str = ""
    path: Path | None = None
    role: Role = Role.ADMIN

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.value)

    def __repr__(self) -> str:  # keep the value out of tracebacks and debug output
        return f"ApiToken(role={self.role.value!r}, source={self.source!r}, path={self.path!r})"


def resolve_token(settings: Settings, environ: Mapping[str, str] | None = None) -> ApiToken:
    """The admin token of this node: environment, configured file, or the generated file."""
    environ = os.environ if environ is None else environ
    from_env = environ.get(TOKEN_ENV, "").strip()
    if from_env:
        token = ApiToken(_checked(from_env, TOKEN_ENV), f"environment variable {TOKEN_ENV}")
    elif settings.http.token_file is not None:
        token = ApiToken(
            _configured(settings.http.token_file), "token file", settings.http.token_file
        )
    else:
        token = _generated(settings.storage.home / TOKEN_FILE_NAME)
    _log_in_force(token)
    return token


def resolve_viewer_token(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> ApiToken | None:
    """The viewer token, if one is configured (environment, then ``viewer_token_file``)."""
    environ = os.environ if environ is None else environ
    from_env = environ.get(VIEWER_TOKEN_ENV, "").strip()
    path = settings.http.viewer_token_file
    if from_env:
        value, source = (
            _checked(from_env, VIEWER_TOKEN_ENV),
            f"environment variable {VIEWER_TOKEN_ENV}",
        )
        path = None
    elif path is not None:
        value, source = _configured(path), "viewer token file"
    else:
        return None
    token = ApiToken(value, source, path, Role.VIEWER)
    _log_in_force(token)
    return token


def resolve_tokens(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> tuple[ApiToken, ...]:
    """Every token in force: the admin token, then the viewer token if there is one."""
    admin = resolve_token(settings, environ)
    viewer = resolve_viewer_token(settings, environ)
    if viewer is None:
        return (admin,)
    if secrets.compare_digest(viewer.value.encode(), admin.value.encode()):
        raise TokenError("the viewer token must differ from the admin token")
    return (admin, viewer)


def _log_in_force(token: ApiToken) -> None:
    log.info(
        "api token in force",
        role=token.role.value,
        source=token.source,
        path=str(token.path or "") or None,
    )


def _configured(path: Path) -> str:
    try:
        return _read(path)
    except FileNotFoundError:
        raise TokenError(f"api token file {path}: not found") from None


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


# -- failed authentications per client ------------------------------------------------------


@dataclass
class FailureLimiter:
    """Failed authentications per client address in a sliding window, in bounded memory.

    At most ``limit`` times are kept per address and at most ``max_clients`` addresses;
    the address seen longest ago is forgotten first.
    """

    limit: int
    window_s: float
    max_clients: int = MAX_TRACKED_CLIENTS
    clock: Callable[[], float] = time.monotonic
    _failures: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def retry_after(self, client: str) -> int | None:
        """Seconds until ``client`` may try again, or None when it may now."""
        now = self.clock()
        with self._lock:
            times = self._failures.get(client)
            if times is None:
                return None
            self._expire(times, now)
            if not times:
                del self._failures[client]
                return None
            if len(times) < self.limit:
                return None
            return max(1, math.ceil(times[0] + self.window_s - now))

    def failed(self, client: str) -> bool:
        """Count a failure; True when this one reached the limit."""
        now = self.clock()
        with self._lock:
            times = self._failures.pop(client, None)
            if times is None:
                times = deque(maxlen=self.limit)
            self._expire(times, now)
            times.append(now)
            self._failures[client] = times  # most recently seen last
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)
            return len(times) >= self.limit

    def tracked(self) -> int:
        with self._lock:
            return len(self._failures)

    def _expire(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window_s:
            times.popleft()


# -- the check on every request --------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """Who is calling: the role and fingerprint of the token, and the client address."""

    role: Role
    token_fingerprint: str
    client: str


class Authenticator:
    """Tokens in force and the failure limiter: one per application."""

    def __init__(self, tokens: Sequence[ApiToken], limiter: FailureLimiter) -> None:
        if not tokens:
            raise ValueError("an API needs at least one token")
        self._tokens = [(t.value.encode(), t) for t in tokens]
        self.limiter = limiter

    def authenticate(self, client: str, given: str | None, needed: Role) -> Access:
        """The caller's access, or 429 (too many failures), 401 (no known token) or 403."""
        wait = self.limiter.retry_after(client)
        if wait is not None:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                detail="too many failed authentications; try again later",
                headers={"Retry-After": str(wait)},
            )
        token = self._match(given.encode() if given is not None else b"")
        if token is None:
            if self.limiter.failed(client):
                log.warning("api client blocked after failed authentications", client=client)
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="missing or invalid bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not token.role.allows(needed):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, detail=f"this needs the {needed.value} role"
            )
        return Access(token.role, token.fingerprint, client)

    def _match(self, given: bytes) -> ApiToken | None:
        """Compare with every token, each in constant time, without stopping early."""
        found = None
        for expected, token in self._tokens:
            if secrets.compare_digest(given, expected) and found is None:
                found = token
        return found


Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


def client_address(request: Request) -> str:
    """The peer's address (the reverse proxy's, behind one)."""
    return request.client.host if request.client is not None else "unknown"


def _require(needed: Role) -> Callable[[Request, Credentials], Access]:
    def dependency(request: Request, credentials: Credentials) -> Access:
        authenticator: Authenticator = request.app.state.authenticator
        given = credentials.credentials if credentials is not None else None
        return authenticator.authenticate(client_address(request), given, needed)

    dependency.__name__ = f"require_{needed.value}"
    return dependency


require_viewer = _require(Role.VIEWER)
require_admin = _require(Role.ADMIN)

ViewerAccess = Annotated[Access, Depends(require_viewer)]
AdminAccess = Annotated[Access, Depends(require_admin)]
