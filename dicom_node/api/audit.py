"""Access audit of the HTTP API: who read patient data, who did what.

Routes that return patient-identifying data (the worklist with its accession numbers, a
study's detail, a heatmap) and every admin route carry the dependency
:func:`audit_read` or :func:`audit_admin` on their router. Before the route runs, it
writes one audit event in its own committed transaction:

* ``kind`` — ``api.<route name>``, e.g. ``api.get_study``, ``api.retry_job``;
* ``actor`` — ``api:<role>``; ``peer_address`` — the client address;
* ``details`` — the role, the token's fingerprint (never the token), the method, the
  route's path template, its path parameters (UIDs and ids) and query parameters.

Written first, so an attempt is recorded even when the route then fails (404, 409), and
failing closed: if the event cannot be written, the request fails and nothing is read.
Nothing here carries patient demographics — the path and query parameters of these
routes are UIDs, ids, dates and priorities.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from dicom_node.api.auth import Access, AdminAccess, ViewerAccess
from storage.audit import record_event
from storage.db import session_scope

KIND_PREFIX = "api."
MAX_PARAMS = 16
MAX_VALUE = 128
MAX_ID = 2**63 - 1


def audit_read(request: Request, access: ViewerAccess) -> None:
    """Dependency of routes returning patient-identifying data."""
    record_access(request, access)


def audit_admin(request: Request, access: AdminAccess) -> None:
    """Dependency of every admin route."""
    record_access(request, access)


def record_access(request: Request, access: Access) -> None:
    """One audit event for this request, committed before the route runs."""
    route = request.scope.get("route")
    name = str(getattr(route, "name", None) or "unknown")
    params = {key: _short(value) for key, value in list(request.path_params.items())[:MAX_PARAMS]}
    query: dict[str, Any] = {}
    for key in list(dict.fromkeys(request.query_params.keys()))[:MAX_PARAMS]:
        values = [_short(v) for v in request.query_params.getlist(key)[:MAX_PARAMS]]
        query[_short(key)] = values[0] if len(values) == 1 else values
    job_id = _int_or_none(request.path_params.get("job_id"))
    details: dict[str, Any] = {
        "role": access.role.value,
        "token": access.token_fingerprint,
        "method": request.method,
        "path": str(getattr(route, "path", request.url.path))[:MAX_VALUE],
    }
    if params:
        details["params"] = params
    if query:
        details["query"] = query
    with session_scope(request.app.state.context.sessions) as session:
        record_event(
            session,
            KIND_PREFIX + name,
            actor=f"api:{access.role.value}",
            job_id=job_id,
            peer_address=access.client[:64],
            details=details,
        )


def _short(value: object) -> str:
    """At most MAX_VALUE characters, NUL replaced: PostgreSQL's JSONB refuses ``\\u0000``,
    and a request must not fail to be audited (and so fail) for a stray byte."""
    return str(value)[:MAX_VALUE].replace("\x00", "\ufffd")


def _int_or_none(value: object) -> int | None:
    """An id for the event's ``job_id`` column; None unless a valid one (the route has not
    validated its parameters yet: 2**63 must not overflow the column)."""
    try:
        number = int(str(value)) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and 1 <= number <= MAX_ID else None
