"""HTTP hardening of the API, through the real uvicorn server a node starts.

* every answer — each operation of the OpenAPI document, with and without a token, the
  dashboard's files, an unknown path — carries the security headers, and every answer of
  ``/api/`` and ``/metrics`` is ``Cache-Control: no-store``;
* a client address that fails authentication ``auth_failure_limit`` times within the
  window is answered 429 with ``Retry-After`` (even with the right token) until the window
  moves on, while other addresses are not affected; the limiter's memory is bounded;
* a request body over ``max_body_bytes`` is 413, whether announced by ``Content-Length``
  or sent chunked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dicom_node.api.auth import FailureLimiter
from dicom_node.api.hardening import CONTENT_SECURITY_POLICY
from tests.api_support import TOKEN, VIEWER_TOKEN, ApiNode, running_api

LIMIT = 10
MAX_BODY = 4096
SECURITY = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": CONTENT_SECURITY_POLICY,
}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[ApiNode]:
    home = tmp_path_factory.mktemp("hardening")
    with running_api(
        home,
        f"sqlite:///{home / 'node.db'}",
        data_dir / "dicom",
        populated=False,
        auth_failure_limit=LIMIT,
        auth_failure_window_s=60.0,
        max_body_bytes=MAX_BODY,
    ) as node:
        yield node


@pytest.fixture(autouse=True)
def fresh_limiter(api: ApiNode) -> None:
    """Each test starts with no failures counted (they share one node and one address)."""
    limiter(api)._failures.clear()


def limiter(api: ApiNode) -> FailureLimiter:
    assert api.node.http is not None and api.node.http.app is not None
    found: FailureLimiter = api.node.http.app.state.authenticator.limiter
    return found


def every_operation(api: ApiNode) -> list[tuple[str, str]]:
    """(method, concrete path) of each operation in the app's OpenAPI document."""
    assert api.node.http is not None and api.node.http.app is not None
    found = []
    for path, item in api.node.http.app.openapi()["paths"].items():
        for method, operation in item.items():
            url = path
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    value = "999999" if parameter["schema"].get("type") == "integer" else "1.2.3"
                    url = url.replace("{" + parameter["name"] + "}", value)
            found.append((method, url))
    return found


def assert_hardened(response: httpx.Response) -> None:
    where = f"{response.request.method} {response.request.url.path} → {response.status_code}"
    for name, value in SECURITY.items():
        assert response.headers.get(name) == value, (where, name, response.headers.get(name))
    path = response.request.url.path
    if path.startswith("/api/") or path == "/metrics":
        assert response.headers.get("cache-control") == "no-store", where


def test_csp_forbids_inline_code_framing_and_other_origins() -> None:
    directives = dict(
        (part.split()[0], part.split()[1:]) for part in CONTENT_SECURITY_POLICY.split("; ")
    )
    assert directives["default-src"] == ["'self'"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert "script-src" not in directives and "style-src" not in directives  # 'self' only
    assert all("'unsafe-inline'" not in values for values in directives.values())


def test_every_answer_carries_the_security_headers(api: ApiNode) -> None:
    operations = every_operation(api)
    assert len(operations) >= 6
    with (
        api.client(TOKEN) as admin,
        api.client(VIEWER_TOKEN) as viewer,
        api.client(None) as anonymous,
    ):
        for method, url in operations:
            for client in (admin, viewer, anonymous):
                assert_hardened(client.request(method, url))  # 200, 401, 403, 404 alike
        for path in ("/", "/dashboard/", "/dashboard/dashboard.js", "/dashboard/dashboard.css"):
            assert_hardened(anonymous.get(path))
        assert_hardened(anonymous.get("/no/such/page"))
        assert_hardened(admin.get("/api/no-such-endpoint"))
        unauthorised = anonymous.get("/api/worklist")
    assert unauthorised.status_code == 401
    assert unauthorised.headers["cache-control"] == "no-store"


def test_repeated_failures_from_one_address_are_answered_429_with_retry_after(
    api: ApiNode,
) -> None:
    with api.client("wrong-token-0123456789") as wrong, api.client(TOKEN) as right:
        refused = [wrong.get("/api/status").status_code for _ in range(LIMIT)]
        blocked = wrong.get("/api/status")
        also_blocked = right.get("/api/worklist")  # the right token too: no guessing on
        health = right.get("/healthz")
        dashboard = right.get("/dashboard/")
    assert refused == [401] * LIMIT
    assert blocked.status_code == 429 and also_blocked.status_code == 429
    assert 1 <= int(blocked.headers["retry-after"]) <= 60
    assert blocked.json() == {"detail": "too many failed authentications; try again later"}
    assert_hardened(blocked)
    assert health.status_code == 200 and dashboard.status_code == 200  # public: no token
    limiter(api)._failures.clear()  # the window moving on, without waiting a minute
    with api.client(TOKEN) as right:
        assert right.get("/api/status").status_code == 200


def test_forbidden_is_not_a_failed_authentication(api: ApiNode) -> None:
    with api.client(VIEWER_TOKEN) as viewer:
        answers = [viewer.post("/api/jobs/999999/retry").status_code for _ in range(2 * LIMIT)]
        assert viewer.get("/api/status").status_code == 200
    assert answers == [403] * (2 * LIMIT)


def test_failure_limiter_slides_its_window_and_bounds_its_memory() -> None:
    now = [1000.0]
    limiter = FailureLimiter(limit=3, window_s=60.0, max_clients=100, clock=lambda: now[0])
    assert [limiter.failed("10.0.0.1") for _ in range(3)] == [False, False, True]
    assert limiter.retry_after("10.0.0.1") == 60
    assert limiter.retry_after("10.0.0.2") is None  # other addresses unaffected
    now[0] += 30
    assert limiter.retry_after("10.0.0.1") == 30
    now[0] += 30.5
    assert limiter.retry_after("10.0.0.1") is None  # the failures left the window
    for index in range(10_000):
        limiter.failed(f"10.1.{index // 256}.{index % 256}")
    assert limiter.tracked() == 100
    assert all(len(times) <= 3 for times in limiter._failures.values())


def test_bodies_over_the_limit_are_413(api: ApiNode) -> None:
    too_big = b"x" * (MAX_BODY + 1)

    def chunked() -> Iterator[bytes]:
        for _ in range(4):
            yield b"y" * (MAX_BODY // 2)

    with api.client(TOKEN) as admin:
        announced = admin.post("/api/jobs/999999/retry", content=too_big)
        streamed = admin.post("/api/jobs/999999/retry", content=chunked())
        small = admin.post("/api/jobs/999999/retry", content=b"{}")
    assert announced.status_code == 413, announced.text
    assert streamed.status_code == 413, streamed.text
    assert "larger than 4096 bytes" in announced.json()["detail"]
    assert_hardened(announced)
    assert small.status_code == 404  # within the limit: the route answered
