"""The one settings object of the node (pydantic-settings).

Sources, strongest first:

1. explicit keyword arguments (tests, embedding);
2. the short environment variables operators know from the docs, e.g. ``DICOM_NODE_PORT``
   (see :data:`FLAT_ENV`);
3. the generic nested form ``DICOM_NODE_<SECTION>__<KEY>``, which exists for every key,
   including sections added later (``DICOM_NODE_STORAGE__DURABLE_WRITES=false``);
4. the TOML file given by ``--config FILE`` or ``DICOM_NODE_CONFIG``;
5. the embedded defaults, which start a working node with nothing configured.

Unknown keys are errors, not silently ignored: a misspelt ``allowed_calling_aets`` must
not leave a node open to everyone. Adding a section later (e.g. ``[inference]``) is
adding one model and one field on :class:`Settings`.

Besides sections, the file holds two arrays of tables: ``[[destinations]]``
(:data:`~dicom_node.dispatch.Destination`, one model per ``type``) and ``[[rules]]``
(:class:`~dicom_node.rules.Rule`). They refer to each other by name; the module that owns
each concept checks it (:func:`dicom_node.dispatch.check_unique_names`,
:func:`dicom_node.rules.check_rules`) and this one reports the key, so a rule sending to
a misspelt destination stops the node at start-up (exit 2, naming
``rules.<n>.destinations``) instead of silently sending nowhere.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from dicom_node.dispatch import (
    Destination,
    DestinationError,
    check_unique_names,
    destination_types,
)
from dicom_node.dispatch.base import field_error, validate_ae_title
from dicom_node.rules import Rule, RuleError, RuleSet, check_rules
from dicom_node.tls import KeyMaterialError, check_key_material, server_context
from inference.manifest import SEGMENT_BUNDLE, finding_bundle_path, is_measured

ENV_PREFIX = "DICOM_NODE_"
CONFIG_ENV = "DICOM_NODE_CONFIG"

# Documented short environment variables → (section, key).
FLAT_ENV: Mapping[str, tuple[str, str]] = {
    "DICOM_NODE_HOME": ("storage", "home"),
    "DICOM_NODE_DATABASE_URL": ("storage", "database_url"),
    "DICOM_NODE_SPOOL_DIR": ("storage", "spool_dir"),
    "DICOM_NODE_AE_TITLE": ("node", "ae_title"),
    "DICOM_NODE_HOST": ("node", "host"),
    "DICOM_NODE_PORT": ("node", "port"),
    "DICOM_NODE_ALLOWED_CALLING_AETS": ("node", "allowed_calling_aets"),
    "DICOM_NODE_ALLOWED_HOSTS": ("node", "allowed_hosts"),
    "DICOM_NODE_HTTP_PORT": ("http", "port"),
    "DICOM_NODE_LOG_LEVEL": ("logging", "level"),
    "DICOM_NODE_LOG_FORMAT": ("logging", "format"),
}

SUPPORTED_DATABASES = ("sqlite", "postgresql")
_TOML_DATA: ContextVar[dict[str, Any]] = ContextVar("_TOML_DATA", default={})  # noqa: B039


class ConfigError(Exception):
    """Invalid configuration; ``str(error)`` is one line naming the key and the reason."""


def _split_list(value: object) -> object:
    """Accept lists, JSON lists or comma-separated strings (handy in env vars)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [item.strip() for item in text.split(",") if item.strip()]


StrList = Annotated[list[str], NoDecode]
# Relative paths are taken from the working directory at start-up.
AbsolutePath = Annotated[Path, AfterValidator(lambda path: path.expanduser().absolute())]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


GIB = 1024**3


class NodeTlsSettings(_Section):
    """``[node.tls]``: DICOM TLS (PS3.15 Annex B) on a port of its own.

    The TLS port is opened next to the plain ``[node] port`` (one AE, one association
    limit for both), so senders can move over one by one; ``tls_only`` closes the plain
    port. Files are checked and loaded at start-up: a missing, unreadable or mismatched
    certificate or key stops the node with the key named, not the first association.
    """

    enabled: bool = Field(False, description="Accept DICOM TLS associations.")
    port: int = Field(2762, ge=1, le=65535, description="TLS port (2762 = dicom-tls).")
    tls_only: bool = Field(False, description="Do not open the plain [node] port.")
    cert_file: AbsolutePath | None = Field(None, description="Our certificate chain (PEM).")
    key_file: AbsolutePath | None = Field(None, description="Our private key (PEM, unencrypted).")
    ca_file: AbsolutePath | None = Field(
        None, description="CA certificates client certificates need."
    )
    verify_client: bool = Field(False, description="Require a client certificate from ca_file.")

    @model_validator(mode="after")
    def _usable(self) -> NodeTlsSettings:
        """Only an enabled section needs its files; each one is named when it is wrong."""
        if not self.enabled:
            return self
        files = {"cert_file": self.cert_file, "key_file": self.key_file, "ca_file": self.ca_file}
        for key, path in files.items():
            if path is None and (key != "ca_file" or self.verify_client):
                raise field_error(key, "required when TLS is enabled")
        cert_file, key_file = self.cert_file, self.key_file
        assert cert_file is not None and key_file is not None
        try:
            check_key_material(
                files,
                lambda: server_context(cert_file, key_file, self.ca_file, self.verify_client),
                "key_file",
            )
        except KeyMaterialError as exc:
            raise field_error(exc.key, exc.reason) from None
        return self


class NodeSettings(_Section):
    """``[node]``: the DICOM listener."""

    ae_title: str = Field("CXR_AI", description="Our AE title (called AE title).")
    host: str = Field("0.0.0.0", min_length=1, description="Address to listen on.")
    port: int = Field(11112, ge=1, le=65535, description="DICOM port.")
    allowed_calling_aets: StrList = Field(
        default_factory=list, description="Calling AE titles allowed to associate; empty = any."
    )
    allowed_hosts: StrList = Field(
        default_factory=list,
        description="Peer IP addresses or networks (CIDR) allowed to associate; empty = any.",
    )
    require_called_ae: bool = Field(
        False, description="Reject associations not addressed to our AE title."
    )
    max_associations: int = Field(16, ge=1, le=1000, description="Concurrent associations.")
    max_pdu_size: int = Field(
        262_144, ge=0, description="Largest PDU we accept, bytes (0 = unlimited)."
    )
    acse_timeout: float = Field(30.0, gt=0, description="Association negotiation timeout, s.")
    dimse_timeout: float = Field(120.0, gt=0, description="DIMSE message timeout, s.")
    network_timeout: float = Field(120.0, gt=0, description="Idle network timeout, s.")
    heartbeat_interval: float = Field(
        10.0, gt=0, description="Seconds between liveness records read by `status`."
    )
    max_dataset_bytes: int = Field(
        GIB, ge=1024, description="Largest C-STORE data set accepted (else 0xA700)."
    )
    max_image_rows: int = Field(8192, ge=1, le=65535, description="Largest Rows accepted.")
    max_image_columns: int = Field(8192, ge=1, le=65535, description="Largest Columns.")
    max_image_bytes: int = Field(
        GIB, ge=1, description="Largest decoded pixel data (Rows × Columns × … × Frames)."
    )
    tls: NodeTlsSettings = Field(default_factory=lambda: NodeTlsSettings())

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return validate_ae_title(value)

    @field_validator("allowed_calling_aets", mode="before")
    @classmethod
    def _split_aets(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_aets(cls, value: list[str]) -> list[str]:
        return [validate_ae_title(title) for title in value]

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR network") from None
        return value


class StorageSettings(_Section):
    """``[storage]``: where data lives."""

    home: AbsolutePath = Field(
        Path("var"), description="Data directory (spool, SQLite file, logs)."
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<home>/node.db."
    )
    spool_dir: AbsolutePath | None = Field(
        None, description="Spool directory; default <home>/spool."
    )
    durable_writes: bool = Field(
        True, description="fsync files and directories before acknowledging a C-STORE."
    )
    min_free_mb: int = Field(
        100, ge=0, description="Refuse C-STOREs (0xA700) when less disk than this is free."
    )

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            backend = make_url(value).get_backend_name()
        except ArgumentError:
            raise ValueError("not a valid SQLAlchemy database URL") from None
        if backend not in SUPPORTED_DATABASES:
            raise ValueError(f"unsupported database {backend!r} (use sqlite or postgresql)")
        return value

    @property
    def effective_database_url(self) -> str:
        """The configured URL, or the embedded SQLite database in ``home``."""
        return self.database_url or f"sqlite:///{self.home / 'node.db'}"

    @property
    def spool_root(self) -> Path:
        return self.spool_dir or self.home / "spool"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"


class HttpSettings(_Section):
    """``[http]``: the HTTP API, metrics and dashboard (:mod:`dicom_node.api`).

    Every endpoint but ``/healthz`` needs a bearer token. The admin token (every endpoint)
    is ``DICOM_NODE_API_TOKEN``, else the first line of ``token_file``, else one generated
    at first start and kept in ``<home>/api-token`` (mode 0600). The optional viewer token
    (reads only) is ``DICOM_NODE_API_VIEWER_TOKEN``, else the first line of
    ``viewer_token_file``.
    """

    enabled: bool = Field(True, description="Serve the HTTP API in serve.")
    host: str = Field("127.0.0.1", min_length=1, description="Address of the HTTP API.")
    port: int = Field(8080, ge=0, le=65535, description="Port of the HTTP API; 0 = any free.")
    token_file: AbsolutePath | None = Field(
        None, description="File holding the API token; default <home>/api-token (generated)."
    )
    viewer_token_file: AbsolutePath | None = Field(
        None, description="File holding the read-only viewer token; default: no viewer token."
    )
    auth_failure_limit: int = Field(
        10, ge=1, description="Failed authentications per client address before 429."
    )
    auth_failure_window_s: float = Field(
        60.0, gt=0, description="Seconds over which failed authentications are counted."
    )
    max_body_bytes: int = Field(
        1_048_576, ge=0, description="Largest request body accepted (larger: 413)."
    )


class InferenceSettings(_Section):
    """``[inference]``: the model bundles and the thresholds in force.

    Thresholds default to the ones each bundle was validated with; overriding them here
    changes what the node reports as present, so every override is logged at start-up.
    """

    findings: list[str] = Field(
        default_factory=lambda: ["pneumonia", "cardiomegaly"],
        min_length=1,
        description="Findings in force: each a shipped screen + confirm bundle pair (the "
        "first one's screen also carries the image gate), or a finding measured from the "
        "anatomy (cardiomegaly, from the cardiothoracic ratio).",
    )
    screen_bundle: Path | None = Field(
        None, description="Screen bundle of the first finding; default: shipped."
    )
    confirm_bundle: Path | None = Field(
        None, description="Confirm bundle of the first finding; default: shipped."
    )
    screen_threshold: float | None = Field(
        None, ge=0, le=1, description="Screen probability that sends an image to confirm."
    )
    confirm_threshold: float | None = Field(
        None, ge=0, le=1, description="Confirm probability at which a finding is present."
    )
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="torch device.")
    threads: int = Field(0, ge=0, le=256, description="CPU threads for torch; 0 = all cores.")
    heatmaps: bool = Field(True, description="Compute Grad-CAM heatmaps.")
    batch_size: int = Field(8, ge=1, le=256, description="Images per forward pass.")
    anatomy: bool = Field(
        True, description="Segment heart and lungs: measurements (CTR, widths, areas), SEG."
    )
    segment_bundle: Path | None = Field(None, description="Segmentation bundle; default: shipped.")
    anatomy_gate: bool = Field(
        True,
        description="Refuse images whose segmentation finds no plausible pair of lungs "
        "(not scored as a chest radiograph).",
    )
    overlay_outlines: bool = Field(True, description="Draw lung and heart outlines on the SC.")
    overlay_ctr_lines: bool = Field(
        True, description="Draw the cardiothoracic ratio's two widths and value on the SC."
    )
    explanation_min_lung_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of the Grad-CAM inside the lung fields below which the SR warns "
        "that the model looked mostly outside the lungs.",
    )
    cardiomegaly_ratio: float = Field(
        0.5, gt=0, lt=1, description="Cardiothoracic ratio above which cardiomegaly is present."
    )

    def cascade_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`inference.cascade.Cascade.load`."""
        kwargs: dict[str, Any] = {
            "findings": tuple(self.findings),
            "heatmaps": self.heatmaps,
            "device": self.device,
            "anatomy": self.anatomy,
            "anatomy_options": {
                "gate": self.anatomy_gate,
                "outlines": self.overlay_outlines,
                "ctr_lines": self.overlay_ctr_lines,
                "min_lung_share": self.explanation_min_lung_share,
                "cardiomegaly_ratio": self.cardiomegaly_ratio,
            },
        }
        if self.segment_bundle is not None:
            kwargs["segment_path"] = self.segment_bundle
        if self.screen_bundle is not None:
            kwargs["screen_path"] = self.screen_bundle
        if self.confirm_bundle is not None:
            kwargs["confirm_path"] = self.confirm_bundle
        if self.screen_threshold is not None:
            kwargs["screen_thresholds"] = {self.findings[0]: self.screen_threshold}
        if self.confirm_threshold is not None:
            kwargs["confirm_thresholds"] = {self.findings[0]: self.confirm_threshold}
        return kwargs

    @field_validator("findings")
    @classmethod
    def _known_findings(cls, value: list[str]) -> list[str]:
        """Each finding must have its shipped bundles (checked without torch); the first
        must be a classifier (its screen carries the image gate)."""
        names = list(dict.fromkeys(name.strip() for name in value))
        if is_measured(names[0]):
            raise ValueError(f"the first finding must be a classifier finding, not {names[0]!r}")
        for name in names:
            if is_measured(name):
                if not (SEGMENT_BUNDLE / "configs" / "metadata.json").is_file():
                    raise ValueError(f"no shipped segment bundle for finding {name!r}")
                continue
            for role in ("screen", "confirm"):
                if not (finding_bundle_path(name, role) / "configs" / "metadata.json").is_file():
                    raise ValueError(f"no shipped {role} bundle for finding {name!r}")
        return names


class WorkerSettings(_Section):
    """``[worker]``: the threads that analyse queued images in ``serve``."""

    threads: int = Field(
        1, ge=0, le=32, description="Worker threads in this process; 0 = receive only."
    )
    batch_size: int = Field(
        8, ge=1, le=256, description="Most jobs one worker claims and analyses together."
    )
    poll_interval: float = Field(
        2.0, gt=0, description="Seconds between queue polls when not woken (multi-process)."
    )
    job_lease: float = Field(
        600.0, gt=0, description="Seconds after which a running job is presumed abandoned."
    )


class SenderSettings(_Section):
    """``[sender]``: delivery of results from the outbox to the destinations."""

    poll_interval: float = Field(2.0, gt=0, description="Seconds between outbox polls.")
    batch_size: int = Field(64, ge=1, le=1000, description="Most sends claimed at once.")
    backoff_base: float = Field(5.0, gt=0, description="First retry within this many s.")
    backoff_cap: float = Field(600.0, gt=0, description="Longest wait between retries, s.")
    max_age: float = Field(
        86_400.0, gt=0, description="Seconds after which a failing send is dead-lettered."
    )
    lease: float = Field(
        300.0, gt=0, description="Seconds after which an unfinished send is tried again."
    )


class RetentionSettings(_Section):
    """``[retention]``: removal of delivered images and outputs from the spool."""

    enabled: bool = Field(True, description="Run the retention sweep in serve.")
    keep_days: float = Field(
        7.0, ge=0, description="Days to keep delivered instances and outputs (0 = at once)."
    )
    interval: float = Field(3600.0, gt=0, description="Seconds between retention sweeps.")


class FindingPriority(_Section):
    """``[priority.findings.<name>]``: how much one finding weighs, and when it escalates.

    ``<name>`` matches a finding by its meaning (``pneumonia`` ↔ "Pneumonia"), or by
    ``code`` when given. Thresholds are on the calibrated probability the SR reports.
    """

    code: str | None = Field(None, description="Code value to match instead of the name.")
    weight: float = Field(1.0, gt=0, le=100, description="Score = weight × probability.")
    urgent_at: float = Field(0.5, ge=0, le=1, description="Probability for URGENT.")
    stat_at: float = Field(
        0.9, ge=0, le=1, description="Probability for STAT (confirmed findings only)."
    )
    highest: Literal["stat", "urgent", "routine"] = Field(
        "stat", description="The highest level this finding may give a study."
    )

    @field_validator("stat_at")
    @classmethod
    def _stat_above_urgent(cls, value: float, info: ValidationInfo) -> float:
        urgent = info.data.get("urgent_at")
        if urgent is not None and value < urgent:
            raise ValueError(f"stat_at must not be below urgent_at ({urgent})")
        return value


def _default_findings() -> dict[str, FindingPriority]:
    """Pneumonia escalates to STAT; pulmonary tuberculosis to URGENT at most: it calls for
    airborne isolation and a read today, not for the next minute. Cardiomegaly never
    escalates a study (a chronic finding, read in turn) and weighs little in its score."""
    return {
        "pneumonia": FindingPriority(),
        "tuberculosis": FindingPriority(code="154283005", highest="urgent"),
        "cardiomegaly": FindingPriority(code="8186001", weight=0.2, highest="routine"),
    }


class PrioritySettings(_Section):
    """``[priority]``: the study-level priority (STAT / URGENT / ROUTINE) of the worklist.

    See :mod:`dicom_node.priority` for the formula. Findings not listed here count with
    the defaults of :class:`FindingPriority`; listing findings replaces the default list.
    """

    unconfirmed_factor: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Score factor of a finding the confirm model did not find present.",
    )
    findings: dict[str, FindingPriority] = Field(default_factory=_default_findings)


class LoggingSettings(_Section):
    """``[logging]``: structured logs on stderr and in ``<home>/logs/node.log``."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = Field("json", description="json lines or key=value text.")
    to_file: bool = Field(True, description="Also write <home>/logs/node.log (rotated).")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


class Settings(BaseSettings):
    """All configuration of a node process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    node: NodeSettings = Field(default_factory=lambda: NodeSettings())
    storage: StorageSettings = Field(default_factory=lambda: StorageSettings())
    http: HttpSettings = Field(default_factory=lambda: HttpSettings())
    inference: InferenceSettings = Field(default_factory=lambda: InferenceSettings())
    worker: WorkerSettings = Field(default_factory=lambda: WorkerSettings())
    sender: SenderSettings = Field(default_factory=lambda: SenderSettings())
    retention: RetentionSettings = Field(default_factory=lambda: RetentionSettings())
    priority: PrioritySettings = Field(default_factory=lambda: PrioritySettings())
    logging: LoggingSettings = Field(default_factory=lambda: LoggingSettings())
    destinations: list[Destination] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)

    @field_validator("destinations")
    @classmethod
    def _unique_destinations(cls, value: list[Destination]) -> list[Destination]:
        try:
            check_unique_names(value)
        except DestinationError as exc:
            raise _keyed_error(exc.key, exc.reason) from None
        return value

    @field_validator("rules")
    @classmethod
    def _check_rules(cls, value: list[Rule], info: ValidationInfo) -> list[Rule]:
        configured = [d.name for d in info.data.get("destinations") or []]
        try:
            check_rules(value, configured)
        except RuleError as exc:
            raise _keyed_error(exc.key, exc.reason) from None
        return value

    @property
    def rule_set(self) -> RuleSet:
        """The routing rules with the configured destination names (default rule if none)."""
        return RuleSet(
            destinations=tuple(d.name for d in self.destinations), rules=tuple(self.rules)
        )

    def destination(self, name: str) -> Destination | None:
        """The destination called ``name``; its ``delivers`` says what it is sent."""
        return next((d for d in self.destinations if d.name == name), None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            _FlatEnvSource(settings_cls),
            env_settings,
            _TomlSource(settings_cls),
        )


class _FlatEnvSource(PydanticBaseSettingsSource):
    """The documented short variables (``DICOM_NODE_PORT`` …) mapped into sections."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ builds the whole dict

    def __call__(self) -> dict[str, Any]:
        data: dict[str, dict[str, Any]] = {}
        for name, (section, key) in FLAT_ENV.items():
            if name in os.environ:
                data.setdefault(section, {})[key] = os.environ[name]
        return data


class _TomlSource(PydanticBaseSettingsSource):
    """The already parsed TOML file of the current :func:`load_settings` call."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _TOML_DATA.get()


def _keyed_error(key: str, reason: str) -> PydanticCustomError:
    """A validation error that names its precise key (a field validator's location is
    only the field), picked up by :func:`describe_error`. Model validators name the key
    relative to their model with :func:`~dicom_node.dispatch.base.field_error`."""
    return PydanticCustomError("invalid_reference", "{reason}", {"key": key, "reason": reason})


def config_path_from_env() -> Path | None:
    """The config file named by ``DICOM_NODE_CONFIG``, if any."""
    value = os.environ.get(CONFIG_ENV, "").strip()
    return Path(value) if value else None


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML config file, turning every failure into a one-line ConfigError."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None


@contextmanager
def _toml_data(data: dict[str, Any]) -> Iterator[None]:
    token = _TOML_DATA.set(data)
    try:
        yield
    finally:
        _TOML_DATA.reset(token)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from all sources; raise :class:`ConfigError` if invalid."""
    path = config_file or config_path_from_env()
    data = read_toml(path) if path is not None else {}
    with _toml_data(data):
        try:
            return Settings(**overrides)
        except ValidationError as exc:
            raise ConfigError(describe_error(exc, path)) from None


def describe_error(exc: ValidationError, path: Path | None) -> str:
    """One line: which key is wrong, why, the offending value and where it came from."""
    errors = exc.errors()
    first = errors[0]
    loc, kind = _file_location(tuple(str(part) for part in first["loc"]))
    ctx = first.get("ctx") or {}
    reason = first["msg"]
    if first["type"] == "extra_forbidden":
        reason = "unknown key" if kind is None else f"unknown key for type {kind!r}"
    if first["type"] == "invalid_field":  # field_error(): a key relative to the model
        loc, reason = (*loc, str(ctx["field"])), str(ctx["reason"])
    key = str(ctx.get("key") or ".".join(loc) or "<root>")
    reason = reason.removeprefix("Value error, ")
    value = first.get("input")
    quiet = isinstance(value, dict) or first["type"] in (
        "missing",
        "invalid_reference",
        "invalid_field",
    )
    shown = "" if quiet else f" (got {value!r})"
    more = f" [+{len(errors) - 1} more]" if len(errors) > 1 else ""
    line = f"{key}: {reason}{shown}, from {_source_of(loc, path)}{more}"
    return " ".join(line.split())


def _file_location(loc: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
    """The location as keys of the file, and the destination type it is in, if any.

    pydantic puts the union member a destination was validated as into the location
    (``destinations.0.dicom.port``); the file has no such key.
    """
    if len(loc) > 2 and loc[0] == "destinations" and loc[2] in destination_types():
        return (*loc[:2], *loc[3:]), loc[2]
    return loc, None


def _source_of(loc: tuple[str, ...], path: Path | None) -> str:
    """Name the source that supplied the key at ``loc`` (env var beats file)."""
    if len(loc) >= 2:
        for name, target in FLAT_ENV.items():
            if target == (loc[0], loc[1]) and name in os.environ:
                return f"environment variable {name}"
        nested = f"{ENV_PREFIX}{loc[0]}__{loc[1]}".upper()
        if nested in os.environ:
            return f"environment variable {nested}"
    if path is not None:
        return f"config file {path}"
    return "defaults"


def effective_document(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data (database password hidden, paths resolved)."""
    data = settings.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["storage"]["database_url"] = _redacted_url(settings.storage.effective_database_url)
    data["storage"]["spool_dir"] = str(settings.storage.spool_root)
    return data


def to_toml(settings: Settings) -> str:
    """Render the effective settings as TOML (database password hidden).

    Sections become ``[section]`` tables, destinations and rules ``[[…]]`` arrays of
    tables (rule conditions as inline tables); the output reads back as the same settings.
    """
    data = effective_document(settings)
    lines: list[str] = []
    for name, values in data.items():
        if isinstance(values, dict):
            lines.extend([f"[{name}]", *_toml_pairs(values), ""])
        elif values:
            for item in values:
                lines.extend([f"[[{name}]]", *_toml_pairs(item), ""])
        else:
            lines.extend([f"# [[{name}]]: none configured", ""])
    return "\n".join(lines)


def _toml_pairs(values: dict[str, Any]) -> list[str]:
    return [f"{_toml_key(key)} = {_toml_value(value)}" for key, value in values.items()]


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _redacted_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(_toml_pairs(value)) + " }" if value else "{}"
    return json.dumps(str(value))
