"""Property-based checks of the API against its own OpenAPI schema (schemathesis).

Every operation of ``/openapi.json`` is called with generated parameters — valid and
invalid ones, with the token — on a populated node per backend; no answer may be a
server error, and every answer must match the schema the operation declares. The number
of examples is bounded so the whole run stays well under a minute per backend.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from dicom_node.api import ApiToken, create_app
from dicom_node.config import load_settings
from storage.db import make_engine, make_session_factory
from storage.spool import Spool
from tests.api_support import TOKEN, ApiNode, running_api
from tests.conftest import BACKENDS
from tests.support import provision_database


@pytest.fixture(scope="module", params=BACKENDS)
def api(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, data_dir: Path
) -> Iterator[ApiNode]:
    home = tmp_path_factory.mktemp(f"schema-{request.param}")
    with (
        provision_database(request.param, home) as url,
        running_api(home, url, data_dir / "dicom") as node,
    ):
        yield node


def openapi_document() -> dict[str, Any]:
    """The schema the node publishes at ``/openapi.json`` (it does not depend on data)."""
    with tempfile.TemporaryDirectory(prefix="openapi-") as home:
        settings = load_settings(Path(os.devnull), storage={"home": home})
        sessions = make_session_factory(make_engine("sqlite://"))
        spool = Spool(Path(home) / "spool")
        return create_app(settings, sessions, spool, ApiToken("x" * 32)).openapi()


schema = schemathesis.openapi.from_dict(openapi_document())


# schemathesis' own strategies use ``random``; hypothesis warns about it, not about us.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_api_conforms_to_its_schema(case: schemathesis.Case, api: ApiNode) -> None:
    case.call_and_validate(
        base_url=api.base_url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        checks=[not_a_server_error, response_schema_conformance],
    )
