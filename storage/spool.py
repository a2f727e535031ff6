"""The spool: received files on disk, durable before anyone is told they are stored.

Layout under the spool root::

    tmp/          files being written (anything left here after a crash was never acked)
    objects/      content-addressed store: objects/ab/<sha256>.dcm (256 fan-out folders,
                  created up front so that storing never has to create and sync one)
    quarantine/   bytes we refused, with a JSON note saying why, for a human to inspect
    outputs/      objects the node made (outputs/sr/<uid>.dcm, outputs/sc/<uid>.dcm,
                  HL7 messages outputs/oru/<control id>.hl7), named by their
                  deterministic SOP Instance UID or message control ID, waiting to be sent

A file is written to ``tmp/``, fsync'd, renamed into ``objects/`` and the directory is
fsync'd, so after :meth:`Spool.store` returns the bytes survive a crash or power loss
(with ``durable=True``). The name is the SHA-256 of the file, so storing identical bytes
twice is naturally idempotent and a file can be verified with ``sha256sum``. Outputs
are written the same way; writing one again (a re-run job) atomically replaces it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Chunk = bytes | bytearray | memoryview
OUT_OF_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
PARALLEL_HASH_BYTES = 1 << 20  # below this, a thread hand-off costs more than it saves
_HASHERS = ThreadPoolExecutor(
    max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="spool-hash"
)


def is_out_of_space(error: OSError) -> bool:
    """True for the errors that mean "the disk (or quota) is full"."""
    return error.errno in OUT_OF_SPACE_ERRNOS


@dataclass(frozen=True)
class SpooledObject:
    """Where a stored file ended up, and what it contains."""

    relpath: str
    path: Path
    sha256: str
    size: int
    already_present: bool


class Spool:
    """Content-addressed, crash-safe file store for received instances."""

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root
        self.durable = durable
        self.tmp_dir = root / "tmp"
        self.objects_dir = root / "objects"
        self.quarantine_dir = root / "quarantine"
        self.outputs_dir = root / "outputs"

    def prepare(self, *, remove_partial: bool = True) -> int:
        """Create the layout and delete leftovers of interrupted writes.

        Returns the number of stale temporary files removed. They are safe to delete:
        a temporary file is only ever renamed into place before the sender is answered.
        Only the listener may remove them (``remove_partial``): a worker process starting
        beside a running listener on a shared spool would delete C-STOREs in flight.
        """
        for directory in (self.tmp_dir, self.objects_dir, self.quarantine_dir, self.outputs_dir):
            self._ensure_dir(directory)
        for prefix in range(256):
            self._ensure_dir(self.objects_dir / f"{prefix:02x}")
        removed = 0
        if not remove_partial:
            return removed
        for leftover in self.tmp_dir.glob("*.part"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def store(self, chunks: Sequence[Chunk]) -> SpooledObject:
        """Durably store the concatenation of ``chunks``; raises ``OSError`` on failure."""
        tmp_path, digest, size = self._write_temp(chunks)
        relpath = f"objects/{digest[:2]}/{digest}.dcm"
        final = self.root / relpath
        try:
            self._ensure_dir(final.parent)
            already_present = final.exists()
            if already_present:
                tmp_path.unlink()
            else:
                os.replace(tmp_path, final)
                self._fsync_dir(final.parent)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        return SpooledObject(relpath, final, digest, size, already_present)

    def store_output(
        self, kind: str, name: str, chunks: Sequence[Chunk], *, suffix: str = ".dcm"
    ) -> str:
        """Durably write an output as ``outputs/<kind>/<name><suffix>``; returns its relpath.

        The name is the object's SOP Instance UID (an HL7 message's control ID): a re-run
        writes the same path, and the rename replaces the earlier file atomically (never a
        half-written object to send).
        """
        if not all(_SAFE_NAME.fullmatch(part) for part in (kind, name, suffix)):
            raise ValueError(f"unsafe output name {kind!r}/{name!r}{suffix!r}")
        tmp_path, _, _ = self._write_temp(chunks)
        relpath = f"outputs/{kind}/{name}{suffix}"
        final = self.root / relpath
        try:
            self._ensure_dir(final.parent)
            os.replace(tmp_path, final)
            self._fsync_dir(final.parent)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        return relpath

    def remove(self, relpath: str) -> bool:
        """Delete a stored object or output (retention); False if it was already gone."""
        path = self.path_of(relpath)
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"{relpath!r} is outside the spool")
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def quarantine(self, chunks: Sequence[Chunk], note: Mapping[str, Any]) -> Path:
        """Keep refused bytes (and why they were refused) for later inspection."""
        tmp_path, digest, size = self._write_temp(chunks)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        final = self.quarantine_dir / f"{stamp}_{digest[:16]}.dcm"
        try:
            self._ensure_dir(self.quarantine_dir)
            os.replace(tmp_path, final)
            note_doc = {"sha256": digest, "size": size, "quarantined_at": stamp, **note}
            final.with_suffix(".json").write_text(json.dumps(note_doc, indent=2, default=str))
            self._fsync_dir(self.quarantine_dir)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        return final

    def path_of(self, relpath: str) -> Path:
        """Absolute path of a stored object from its database ``spool_path``."""
        return self.root / relpath

    def free_bytes(self) -> int:
        """Bytes available to us on the spool's file system."""
        return shutil.disk_usage(self._existing_root()).free

    def disk_usage(self) -> tuple[int, int, int]:
        """``(total, used, free)`` bytes of the spool's file system."""
        usage = shutil.disk_usage(self._existing_root())
        return usage.total, usage.used, usage.free

    def _existing_root(self) -> Path:
        path = self.root
        while not path.exists() and path != path.parent:
            path = path.parent
        return path

    def _write_temp(self, chunks: Sequence[Chunk]) -> tuple[Path, str, int]:
        """Write to a temporary file while hashing the same bytes on another core.

        hashlib and os.write both release the GIL, so for the multi-megabyte objects a
        radiograph is, hashing costs no latency: it overlaps with the write and fsync.
        """
        views = [memoryview(chunk).cast("B") for chunk in chunks]
        size = sum(len(view) for view in views)
        hasher = hashlib.sha256()
        hashing = _HASHERS.submit(_hash_all, hasher, views) if size >= PARALLEL_HASH_BYTES else None
        if hashing is None:
            _hash_all(hasher, views)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".part")
        tmp_path = Path(name)
        try:
            try:
                for view in views:
                    _write_all(fd, view)
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
                if hashing is not None:
                    hashing.result()  # never leave a thread reading buffers we hand back
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        return tmp_path, hasher.hexdigest(), size

    def _ensure_dir(self, directory: Path) -> None:
        """mkdir -p, fsyncing each parent whose entries changed (new dirs must survive too)."""
        missing: list[Path] = []
        current = directory
        while not current.exists():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            # A concurrent writer may create it first; fsync anyway, we must not return
            # before the entry is durable, whoever made it.
            path.mkdir(exist_ok=True)
            self._fsync_dir(path.parent)

    def _fsync_dir(self, directory: Path) -> None:
        if not self.durable:
            return
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _hash_all(hasher: Any, views: Sequence[memoryview]) -> None:
    for view in views:
        hasher.update(view)


def _write_all(fd: int, view: memoryview) -> None:
    """``os.write`` until everything is written (a regular file may take it in parts)."""
    while view:
        written = os.write(fd, view)
        view = view[written:]
