"""Installed model versions and which of them are in force, per finding and role.

A bundle is *installed* when its checks pass (every hashed file matches its manifest,
a model card, coded labels with thresholds, a valid population, a known role): it is
copied read-only to ``<home>/models/<name>/<version>`` and registered. *Activating*
``name@version`` puts it in force for its finding and role; *rollback* goes back to what
was in force before the finding's last activation; *shadow* runs a candidate beside the
active model. Each is one appended assignment row (:mod:`storage.registry`), audited
with who and why. Slots that were never assigned run the configured (by default the
shipped) bundles, so a node without a registry behaves exactly as before.

Reading manifests needs no torch: everything here is fast enough for the CLI.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from dicom_node.config import Settings
from dicom_node.model_bundles import ConfiguredBundle, configured_bundles
from inference.manifest import WEIGHTS, BundleError, read_metadata, verify
from inference.population import Population
from storage import registry as rows
from storage.models import ModelVersion
from storage.registry import ACTIVE, SHADOW

ROLES = ("screen", "confirm", "segment")
CARD = "docs/README.md"
MEASURED = "cardiomegaly"  # the finding a segment bundle answers (its "cardiomegaly" block)


class RegistryError(Exception):
    """A request the registry refuses (unknown version, failed checks, nothing to undo)."""


@dataclass(frozen=True)
class BundleFacts:
    """What the registry needs to know of a bundle, read and checked from its files."""

    name: str
    version: str
    role: str
    finding: str
    finding_code: str
    sha256: str
    card: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def check_bundle(path: Path) -> BundleFacts:
    """Every check ``install`` makes; raises :class:`RegistryError` with the first
    failure (a bundle that fails any of them never reaches a worker)."""
    try:
        meta = read_metadata(path)
        digests = verify(path, meta)
    except BundleError as exc:
        raise RegistryError(str(exc)) from exc
    problems = []
    for key in ("name", "version", "role", "labels", "thresholds", "calibration"):
        if not meta.get(key):
            problems.append(f"metadata.json has no {key!r}")
    if problems:
        raise RegistryError(f"{path}: " + "; ".join(problems))
    role = str(meta["role"])
    if role not in ROLES:
        raise RegistryError(f"{path}: role {role!r} is not one of {', '.join(ROLES)}")
    card = path / CARD
    if not card.is_file() or not card.read_text(errors="replace").strip():
        raise RegistryError(f"{path}: no model card ({CARD})")
    for label in meta["labels"]:
        missing = [k for k in ("name", "code", "scheme", "meaning") if not label.get(k)]
        if missing:
            raise RegistryError(f"{path}: label {label} lacks {', '.join(missing)}")
        if label["name"] not in meta["thresholds"]:
            raise RegistryError(f"{path}: no threshold for label {label['name']!r}")
    try:
        Population.from_metadata(meta.get("population"))
    except (ValueError, TypeError, IndexError) as exc:
        raise RegistryError(f"{path}: invalid population: {exc}") from exc
    if not meta.get("population"):
        raise RegistryError(f"{path}: metadata.json declares no population")
    answered = finding_of(meta)
    if answered is None:
        raise RegistryError(f"{path}: a segment bundle needs its 'cardiomegaly' block")
    finding, code = answered
    return BundleFacts(
        name=str(meta["name"]),
        version=str(meta["version"]),
        role=role,
        finding=finding,
        finding_code=code,
        sha256=digests[WEIGHTS],
        card=card_summary(meta),
    )


def finding_of(meta: dict[str, Any]) -> tuple[str, str] | None:
    """The finding a bundle answers and its code: a classifier's first label, a
    segment bundle's "cardiomegaly" block (None when it has none)."""
    if meta.get("role") == "segment":
        code = (meta.get("cardiomegaly") or {}).get("code")
        return (MEASURED, str(code)) if code else None
    first = (meta.get("labels") or [{}])[0]
    return (str(first["name"]), str(first["code"])) if first.get("code") else None


def card_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The figures the live performance is compared with, and the version's decision
    parameters, as the card states them."""
    return {
        "eval_metrics": meta.get("eval_metrics", {}),
        "thresholds": meta.get("thresholds", {}),
        "calibration": meta.get("calibration", {}),
        "cardiomegaly": meta.get("cardiomegaly"),
        "population": meta.get("population", {}),
        "provenance": meta.get("provenance"),
    }


def models_dir(settings: Settings) -> Path:
    return settings.storage.home / "models"


def install(session: Session, settings: Settings, source: Path, *, actor: str) -> ModelVersion:
    """Check ``source``, copy it read-only into ``<home>/models`` and register it.

    Installing the same name@version twice is a no-op when the weights are identical and
    refused otherwise: a version names one model forever.
    """
    facts = check_bundle(source)
    existing = rows.find_version(session, facts.name, facts.version)
    if existing is not None:
        if existing.sha256 != facts.sha256:
            raise RegistryError(
                f"{facts.ref} is already installed with other weights "
                f"(sha256 {existing.sha256[:12]}…); give the new bundle a new version"
            )
        return existing
    target = models_dir(settings) / facts.name / facts.version
    _copy_read_only(source, target)
    check_bundle(target)  # the copy, not only the source, is what workers will load
    return rows.add_version(
        session,
        ModelVersion(
            name=facts.name,
            version=facts.version,
            finding=facts.finding,
            finding_code=facts.finding_code,
            role=facts.role,
            sha256=facts.sha256,
            path=str(target),
            parent=(facts.card.get("provenance") or {}).get("parent"),
            card=facts.card,
        ),
        actor=actor,
    )


def _copy_read_only(source: Path, target: Path) -> None:
    """Copy to a temporary sibling, make it read-only, then rename: a crash leaves
    either no folder or a complete one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # a complete copy from an install whose commit failed
        _make_writable(target)
        shutil.rmtree(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        shutil.copytree(source, staging / "bundle")
        for root, dirs, files in os.walk(staging / "bundle"):
            for name in files:
                os.chmod(Path(root) / name, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            for name in dirs:
                os.chmod(Path(root) / name, 0o555)
        os.chmod(staging / "bundle", 0o555)
        os.rename(staging / "bundle", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_writable(path: Path) -> None:
    for root, dirs, _files in os.walk(path):
        os.chmod(root, 0o755)
        for name in dirs:
            os.chmod(Path(root) / name, 0o755)


def parse_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition("@")
    if not sep or not name or not version:
        raise RegistryError(f"{ref!r}: expected NAME@VERSION")
    return name, version


def version_of(session: Session, ref: str) -> ModelVersion:
    name, version = parse_ref(ref)
    row = rows.find_version(session, name, version)
    if row is None:
        raise RegistryError(f"{ref} is not installed (dicom-node models install DIR)")
    return row


def activate(session: Session, ref: str, *, actor: str, reason: str | None) -> ModelVersion:
    """Put ``ref`` in force for its finding and role (the files are checked again)."""
    row = version_of(session, ref)
    check_bundle(Path(row.path))
    rows.assign(session, row.finding, row.role, ACTIVE, row, actor=actor, reason=reason)
    return row


def rollback(
    session: Session, finding: str, *, actor: str, reason: str | None
) -> tuple[str, ModelVersion | None]:
    """Undo ``finding``'s last activation: its role goes back to what was active before
    (an earlier version, or the configured bundle). Returns the role and what is now in
    force (None: the configured bundle)."""
    finding = finding_name(session, finding)
    history = rows.history(session, finding, ACTIVE)
    if not history:
        raise RegistryError(f"nothing was ever activated for {finding}")
    last = history[0]
    earlier = [a for a in history[1:] if a.role == last.role]
    previous = rows.version_by_id(session, earlier[0].model_version_id) if earlier else None
    if previous is None and last.model_version_id is None:
        raise RegistryError(f"{finding} already runs its configured {last.role} bundle")
    rows.assign(session, finding, last.role, ACTIVE, previous, actor=actor, reason=reason)
    return last.role, previous


def shadow(
    session: Session, ref: str | None, *, finding: str | None, actor: str, reason: str | None
) -> ModelVersion | None:
    """Run ``ref`` as its finding's shadow; ``ref`` None with ``finding``: stop it."""
    if ref is not None:
        row = version_of(session, ref)
        check_bundle(Path(row.path))
        rows.assign(session, row.finding, row.role, SHADOW, row, actor=actor, reason=reason)
        return row
    if finding is None:
        raise RegistryError("name the shadow to stop: NAME@VERSION or --finding")
    finding = finding_name(session, finding)
    current = rows.in_force(session)
    roles = [
        role for (f, role, slot), v in current.items() if f == finding and slot == SHADOW and v
    ]
    if not roles:
        raise RegistryError(f"{finding} has no shadow run")
    for role in roles:
        rows.assign(session, finding, role, SHADOW, None, actor=actor, reason=reason)
    return None


def finding_name(session: Session, finding: str) -> str:
    """A finding given by name or by code (e.g. 233604007) → its name."""
    for row in rows.list_versions(session):
        if finding in (row.finding, row.finding_code):
            return row.finding
    return finding


# -- what is in force ------------------------------------------------------------------


@dataclass(frozen=True)
class ShadowRun:
    """A candidate version run after the active models on the same images."""

    version: ModelVersion


@dataclass
class Plan:
    """The bundles a worker runs: per finding and role, a registry version or the
    configured bundle; plus the shadow runs. ``generation`` is the registry state it
    was read at."""

    generation: int
    versions: dict[tuple[str, str], ModelVersion] = field(default_factory=dict)
    shadows: list[ShadowRun] = field(default_factory=list)

    @property
    def paths(self) -> dict[str, dict[str, Path]]:
        """finding → role → folder of every registry version in force."""
        paths: dict[str, dict[str, Path]] = {}
        for (finding, role), version in self.versions.items():
            paths.setdefault(finding, {})[role] = Path(version.path)
        return paths


def slot_of(bundle: ConfiguredBundle) -> tuple[str, str]:
    """(finding, role) of a configured slot; the segment slot answers cardiomegaly."""
    return (MEASURED, "segment") if bundle.role == "segment" else (bundle.finding, bundle.role)


def plan(settings: Settings, session: Session) -> Plan:
    """What is in force now for this configuration."""
    current = rows.in_force(session)
    result = Plan(generation=rows.generation(session))
    for bundle in configured_bundles(settings):
        finding, role = slot_of(bundle)
        version = current.get((finding, role, ACTIVE))
        if version is not None:
            result.versions[(finding, role)] = version
        candidate = current.get((finding, role, SHADOW))
        if candidate is not None:
            result.shadows.append(ShadowRun(candidate))
    return result


def listing(settings: Settings, session: Session) -> list[dict[str, Any]]:
    """Every version a finding can use: the configured bundles and the installed ones,
    each with its state (active, shadow or installed) and where it comes from."""
    from dicom_node.model_bundles import describe

    current = rows.in_force(session)
    active_ids = {v.id for (_f, _r, slot), v in current.items() if v and slot == ACTIVE}
    shadow_ids = {v.id for (_f, _r, slot), v in current.items() if v and slot == SHADOW}
    entries = []
    for bundle in configured_bundles(settings):
        finding, role = slot_of(bundle)
        entry = describe(bundle)
        replaced = current.get((finding, role, ACTIVE)) is not None
        entry.update(
            {
                # a segmentation bundle run for the anatomy alone answers no finding
                "finding": finding if MEASURED in bundle.finding else bundle.finding,
                "state": "installed" if replaced else "active",
                "source": "configured",
                "parent": None,
            }
        )
        entries.append(entry)
    for row in rows.list_versions(session):
        state = "active" if row.id in active_ids else "shadow" if row.id in shadow_ids else None
        entries.append(
            {
                "finding": row.finding,
                "finding_code": row.finding_code,
                "role": row.role,
                "path": row.path,
                "name": row.name,
                "version": row.version,
                "sha256": row.sha256,
                "thresholds": row.card.get("thresholds", {}),
                "size_bytes": None,
                "error": None,
                "state": state or "installed",
                "source": "registry",
                "parent": row.parent,
                "installed_at": row.installed_at.isoformat(),
                "installed_by": row.installed_by,
            }
        )
    return entries


def cards(settings: Settings, session: Session) -> dict[tuple[str, str], dict[str, Any]]:
    """(name, version) → the card summary of every version known here."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for bundle in configured_bundles(settings):
        try:
            meta = read_metadata(bundle.path)
        except BundleError:
            continue
        found[(str(meta.get("name")), str(meta.get("version")))] = card_summary(meta)
    for row in rows.list_versions(session):
        found[(row.name, row.version)] = row.card
    return found
