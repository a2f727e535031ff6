"""Configuration: defaults, TOML, environment overrides, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dicom_node.config import ConfigError, Settings, load_settings, to_toml, validate_ae_title
from dicom_node.dispatch import DicomDestination, Hl7Destination
from storage.db import head_revision
from tests.support import REPO_ROOT, run


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_embedded_defaults_start_a_node_in_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.node.ae_title == "CXR_AI"
    assert settings.node.port == 11112
    assert settings.node.allowed_calling_aets == []
    assert settings.storage.home == tmp_path / "var"
    assert settings.storage.effective_database_url == f"sqlite:///{tmp_path / 'var' / 'node.db'}"
    assert settings.storage.spool_root == tmp_path / "var" / "spool"
    assert settings.storage.durable_writes is True


def test_toml_file_sets_every_documented_key(tmp_path: Path) -> None:
    config = write(
        tmp_path / "node.toml",
        f"""
[node]
ae_title = "TOML_AE"
host = "127.0.0.1"
port = 10104
allowed_calling_aets = ["PACS", "CR_ROOM_1"]
allowed_hosts = ["10.1.0.0/16"]

[storage]
home = "{tmp_path / "data"}"
database_url = "postgresql+psycopg2://node:secret@db.example/node"

[http]
port = 8081
""",
    )
    settings = load_settings(config)
    assert (settings.node.ae_title, settings.node.host, settings.node.port) == (
        "TOML_AE",
        "127.0.0.1",
        10104,
    )
    assert settings.node.allowed_calling_aets == ["PACS", "CR_ROOM_1"]
    assert settings.node.allowed_hosts == ["10.1.0.0/16"]
    assert settings.storage.home == tmp_path / "data"
    assert settings.storage.effective_database_url.startswith("postgresql+psycopg2://")
    assert settings.http.port == 8081


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "node.toml", '[node]\nae_title = "FROM_ENV_FILE"\n')
    monkeypatch.setenv("DICOM_NODE_CONFIG", str(config))
    assert load_settings().node.ae_title == "FROM_ENV_FILE"


def test_environment_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(
        tmp_path / "node.toml", '[node]\nae_title = "TOML_AE"\nport = 104\n[http]\nport = 8081\n'
    )
    monkeypatch.setenv("DICOM_NODE_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("DICOM_NODE_DATABASE_URL", "sqlite:////tmp/elsewhere.db")
    monkeypatch.setenv("DICOM_NODE_AE_TITLE", "ENV_AE")
    monkeypatch.setenv("DICOM_NODE_PORT", "11113")
    monkeypatch.setenv("DICOM_NODE_HTTP_PORT", "9090")
    settings = load_settings(config)
    assert settings.node.ae_title == "ENV_AE"
    assert settings.node.port == 11113
    assert settings.http.port == 9090
    assert settings.storage.home == tmp_path / "h"
    assert settings.storage.effective_database_url == "sqlite:////tmp/elsewhere.db"


def test_nested_environment_variables_reach_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_STORAGE__DURABLE_WRITES", "false")
    monkeypatch.setenv("DICOM_NODE_NODE__ALLOWED_CALLING_AETS", "PACS, MODALITY")
    monkeypatch.setenv("DICOM_NODE_ALLOWED_HOSTS", '["127.0.0.1", "10.0.0.0/8"]')
    settings = load_settings()
    assert settings.storage.durable_writes is False
    assert settings.node.allowed_calling_aets == ["PACS", "MODALITY"]
    assert settings.node.allowed_hosts == ["127.0.0.1", "10.0.0.0/8"]


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("DICOM_NODE_PORT", "70000", "node.port"),
        ("DICOM_NODE_PORT", "0", "node.port"),
        ("DICOM_NODE_PORT", "eleven", "node.port"),
        ("DICOM_NODE_HTTP_PORT", "-1", "http.port"),
        ("DICOM_NODE_AE_TITLE", "A_TITLE_THAT_IS_TOO_LONG", "node.ae_title"),
        ("DICOM_NODE_AE_TITLE", "BACK\\SLASH", "node.ae_title"),
        ("DICOM_NODE_AE_TITLE", "TAB\tAE", "node.ae_title"),
        ("DICOM_NODE_AE_TITLE", "   ", "node.ae_title"),
        ("DICOM_NODE_ALLOWED_CALLING_AETS", "PACS,WAY_TOO_LONG_FOR_AN_AE", "allowed_calling_aets"),
        ("DICOM_NODE_ALLOWED_HOSTS", "not-an-ip", "node.allowed_hosts"),
        ("DICOM_NODE_DATABASE_URL", "mysql://db/node", "storage.database_url"),
        ("DICOM_NODE_DATABASE_URL", "no url at all", "storage.database_url"),
    ],
)
def test_invalid_values_name_key_and_source(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert expected in message
    assert env in message
    assert "\n" not in message


def test_unknown_toml_key_is_an_error(tmp_path: Path) -> None:
    config = write(tmp_path / "node.toml", '[node]\nallowed_calling_aet = ["PACS"]\n')
    with pytest.raises(ConfigError, match=r"node\.allowed_calling_aet: unknown key"):
        load_settings(config)


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    config = write(tmp_path / "node.toml", "[nodes]\nport = 1\n")
    with pytest.raises(ConfigError, match=r"nodes: unknown key"):
        load_settings(config)


def test_bad_toml_and_missing_file_are_one_line_errors(tmp_path: Path) -> None:
    broken = write(tmp_path / "broken.toml", "[node\nport = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml")


def test_ae_title_rules() -> None:
    assert validate_ae_title("  CXR_AI ") == "CXR_AI"
    assert validate_ae_title("A" * 16) == "A" * 16
    for bad in ("", "A" * 17, "X\\Y", "X\x00Y", "É"):
        with pytest.raises(ValueError):
            validate_ae_title(bad)


def test_effective_config_renders_as_toml_without_password(tmp_path: Path) -> None:
    settings = Settings(
        storage={"home": tmp_path, "database_url": "postgresql+psycopg2://u:s3cret@h/db"}
    )
    rendered = to_toml(settings)
    assert "s3cret" not in rendered
    assert "[node]" in rendered and 'ae_title = "CXR_AI"' in rendered


@pytest.mark.parametrize("command", [["serve"], ["status", "--json"], ["db", "upgrade"]])
def test_cli_exits_2_with_one_line_for_invalid_config(tmp_path: Path, command: list[str]) -> None:
    config = write(tmp_path / "node.toml", "[node]\nport = 99999\n")
    result = run(
        [sys.executable, "-m", "dicom_node", *command, "--config", str(config)], cwd=tmp_path
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "node.port" in lines[0] and str(config) in lines[0]
    assert result.stdout == ""
    assert not (tmp_path / "var").exists(), "nothing may be created on a bad config"


ROUTING = """
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "10.0.0.5"
port = 104

[[destinations]]
name = "research"
ae_title = "RESEARCH"
host = "10.0.0.6"
port = 11112
calling_ae_title = "CXR_AI_OUT"

[[rules]]
name = "research-scanner"
pipeline = "ignore"
[rules.match]
calling_aet = ["RESEARCH_CR"]

[[rules]]
name = "adult-chest"
pipeline = "cxr-cascade"
destinations = ["pacs"]
[rules.match]
all = [ { attribute = "Modality", in = ["CR", "DX"] },
        { not = { attribute = "PatientAge", range = { max = 17 } } },
        { any = [ { attribute = "BodyPartExamined", equals = "CHEST" },
                  { attribute = "BodyPartExamined", absent = true } ] } ]
"""


def test_destinations_rules_and_pipeline_sections(tmp_path: Path) -> None:
    config = write(
        tmp_path / "node.toml",
        ROUTING
        + """
[worker]
threads = 2
batch_size = 4
[sender]
backoff_base = 1.5
max_age = 3600
[retention]
keep_days = 0
""",
    )
    settings = load_settings(config)
    assert [d.name for d in settings.destinations] == ["pacs", "research"]
    assert settings.destination("research").calling_ae_title == "CXR_AI_OUT"  # type: ignore[union-attr]
    rules = settings.rule_set
    assert [r.name for r in rules.effective_rules] == ["research-scanner", "adult-chest"]
    assert rules.rules[0].pipeline == "none" and rules.destinations == ("pacs", "research")
    assert (settings.worker.threads, settings.worker.batch_size) == (2, 4)
    assert (settings.sender.backoff_base, settings.sender.max_age) == (1.5, 3600)
    assert settings.retention.keep_days == 0


def test_no_rules_means_the_built_in_default(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path / "node.toml", ""))
    assert [r.name for r in settings.rule_set.effective_rules] == ["default-chest-cr-dx"]
    assert settings.destinations == [] and settings.worker.threads == 1


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (
            ROUTING.replace('destinations = ["pacs"]', 'destinations = ["pacs", "archiv"]'),
            "rules.1.destinations",
            "unknown destination 'archiv' (configured: pacs, research)",
        ),
        (
            ROUTING.replace('name = "research"\n', 'name = "pacs"\n'),
            "destinations.1.name",
            "'pacs' is used twice",
        ),
        (
            ROUTING.replace('name = "adult-chest"', 'name = "research-scanner"'),
            "rules.1.name",
            "'research-scanner' is used twice",
        ),
        (ROUTING.replace('equals = "CHEST"', 'equal = "CHEST"'), "rules.1.match", ""),
        (ROUTING.replace("port = 104", "port = 0"), "destinations.0.port", "greater than"),
        (
            ROUTING.replace('name = "pacs"\n', 'name = "pacs"\ntype = "stow"\n'),
            "destinations.0.type",
            "unknown destination type 'stow' (known: dicom, hl7, dicomweb)",
        ),
        (
            ROUTING.replace("port = 104", "port = 104\naetitle = 'PACS'"),
            "destinations.0.aetitle",
            "unknown key for type 'dicom'",
        ),
        (
            ROUTING.replace('name = "pacs"\n', 'name = "pacs"\ntype = "hl7"\n'),
            "destinations.0.ae_title",
            "unknown key for type 'hl7'",
        ),
        (
            ROUTING.replace(
                'destinations = ["pacs"]', 'destinations = ["pacs"]\noutputs = ["pdf"]'
            ),
            "rules.1.outputs",
            "unknown output type 'pdf' (known: pm, sc, seg, sr)",
        ),
        ("[worker]\nthreads = -1\n", "worker.threads", "greater than or equal to 0"),
    ],
)
def test_routing_errors_name_the_key(tmp_path: Path, text: str, key: str, reason: str) -> None:
    config = write(tmp_path / "node.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert message.startswith(key) and reason in message and str(config) in message
    assert "\n" not in message


def test_destination_types_and_rule_outputs(tmp_path: Path) -> None:
    text = ROUTING.replace('destinations = ["pacs"]', 'destinations = ["pacs"]\noutputs = ["sr"]')
    text += """
[[destinations]]
name = "ris"
type = "hl7"
host = "10.0.0.7"
port = 2575
receiving_facility = "RADIOLOGY"
"""
    settings = load_settings(write(tmp_path / "node.toml", text))
    pacs, ris = settings.destination("pacs"), settings.destination("ris")
    assert isinstance(pacs, DicomDestination) and isinstance(ris, Hl7Destination)
    assert (pacs.delivers, ris.delivers) == ("objects", "study_events")
    assert ris.receiving_facility == "RADIOLOGY" and ris.timeout("connect") == 30
    assert [rule.outputs for rule in settings.rules] == [("sr", "sc", "seg"), ("sr",)]
    again = load_settings(write(tmp_path / "shown.toml", to_toml(settings)))
    assert again.destinations == settings.destinations and again.rules == settings.rules


def test_validating_a_configuration_loads_no_sender() -> None:
    code = (
        "import sys, dicom_node.config; "
        "print(sorted(m for m in ('pynetdicom', 'hl7apy') if m in sys.modules))"
    )
    result = run([sys.executable, "-c", code], cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_unknown_destination_in_a_rule_exits_2(tmp_path: Path) -> None:
    text = ROUTING.replace('destinations = ["pacs"]', 'destinations = ["archiv"]')
    config = write(tmp_path / "node.toml", text)
    result = run(
        [sys.executable, "-m", "dicom_node", "config", "check", "--config", str(config)],
        cwd=tmp_path,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "rules.1.destinations" in line and "'archiv'" in line


def test_config_show_renders_routing_that_reads_back_the_same(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path / "node.toml", ROUTING))
    rendered = write(tmp_path / "shown.toml", to_toml(settings))
    again = load_settings(rendered)
    assert again.destinations == settings.destinations
    assert again.rules == settings.rules
    assert "[[rules]]" in rendered.read_text() and "[[destinations]]" in rendered.read_text()


def test_admin_commands_speak_json(tmp_path: Path) -> None:
    config = write(tmp_path / "node.toml", ROUTING)
    env = {
        "DICOM_NODE_DATABASE_URL": "postgresql+psycopg2://u:s3cret@127.0.0.1:1/db",
        "PATH": "/usr/bin:/bin",
    }
    base = [sys.executable, "-m", "dicom_node"]
    check = run(
        [*base, "config", "check", "--json", "--config", str(config)], cwd=tmp_path, env=env
    )
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout) == {
        "valid": True,
        "destinations": ["pacs", "research"],
        "rules": ["research-scanner", "adult-chest"],
    }
    shown = run([*base, "config", "show", "--json", "--config", str(config)], cwd=tmp_path, env=env)
    document = json.loads(shown.stdout)
    assert "s3cret" not in shown.stdout and document["rules"][1]["name"] == "adult-chest"
    upgraded = run(
        [*base, "db", "upgrade", "--json"],
        cwd=tmp_path,
        env={"DICOM_NODE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert json.loads(upgraded.stdout)["revision"] == head_revision()
