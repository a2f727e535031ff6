"""Deterministic UIDs for the objects the node writes back to PACS.

A job that crashes after sending its SR and is then re-run must not leave two different
SRs for one image in the archive. So every output UID is a pure function of what
determines the output's content: the source instance (or series), the kind of output
("sr", "sc", "pm"), the identity of the models that produced it (name, version, the label
they scored and the threshold in force) and, for the SR, the study priority it reports.
Same inputs → same UIDs, and a PACS receiving the re-sent object sees an instance it
already holds. A new model version, threshold or priority changes the content, and
therefore the UIDs: one SOP Instance UID must never name two different contents
(PS3.3 C.12.1.1.1).

The UIDs are UUID-derived, root ``2.25`` (PS3.5 B.2): the UUID is a name-based version 5
UUID (ISO/IEC 9834-8, RFC 4122 §4.3) in a namespace of our own, so no organisational UID
root has to be registered. Two pitfalls of the obvious alternative are avoided:
``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy and returns
a *random* UUID, and its default prefix concatenates the sources without a separator
(``["ab", "c"]`` and ``["a", "bc"]`` collide). Here the name is an unambiguous JSON array.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydicom.dataset import Dataset
from pydicom.uid import UID

if TYPE_CHECKING:
    from inference.cascade import Finding

OutputKind = Literal["sr", "sc", "pm", "seg"]

# The namespace of every UID this node derives; changing it changes every output UID.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr-ai-node:dicom-results:v1")


def derived_uid(*parts: str) -> UID:
    """A ``2.25`` UID from a name-based UUID of ``parts`` (order and boundaries matter)."""
    name = json.dumps(list(parts), separators=(",", ":"))
    return UID(f"2.25.{uuid.uuid5(NAMESPACE, name).int}")


def model_identities(findings: Iterable[Finding]) -> list[str]:
    """What of the models determines the content: sorted, one entry per model and label.

    The probability is left out on purpose: it follows from the model and the image, and a
    re-run on other hardware may differ in the last float digits without being a new result.
    """
    return sorted(
        {
            f"{f.model_name}|{f.model_version}|{f.label.scheme}:{f.label.code}|{f.threshold:.6g}"
            for f in findings
        }
    )


@dataclass(frozen=True)
class OutputUIDs:
    """Series and SOP Instance UID of one output object."""

    series_instance_uid: UID
    sop_instance_uid: UID


def result_uids(
    source: Dataset,
    kind: OutputKind,
    models: Sequence[str],
    source_variant: str | None = None,
    priority: str | None = None,
) -> OutputUIDs:
    """UIDs of the ``kind`` output for ``source``, produced by ``models``.

    The instance UID derives from the source SOP Instance UID. The series UID derives from
    the source *series*, so the results for the images of one acquisition series (a PA and
    a lateral, say) share one result series instead of scattering into one series per image.

    ``source_variant`` distinguishes sources that share a SOP Instance UID but not their
    content (a modality re-sending a changed image under the old UID): each gets its own
    output instance UIDs, since one UID must never name two different reports.

    ``priority`` is the study-level priority an SR carries: it changes the report's content
    (a second image of the study may raise it), so it changes the instance UID — not the
    series UID, so that both reports of the image stay in one result series. Without a
    priority the UIDs are those of earlier versions.
    """
    if not models:
        raise ValueError("output UIDs need at least one model identity")
    extra: tuple[str, ...] = (f"variant:{source_variant}",) if source_variant else ()
    if priority:
        extra += (f"priority:{priority.lower()}",)
    series = derived_uid("series", str(source.SeriesInstanceUID), kind, *models)
    instance = derived_uid("instance", str(source.SOPInstanceUID), kind, *models, *extra)
    return OutputUIDs(series, instance)


def segmentation_uids(
    source: Dataset, model_name: str, model_version: str, source_variant: str | None = None
) -> OutputUIDs:
    """UIDs of the SEG of ``source`` made by the segmentation model ``name`` ``version``.

    The SR references the SEG's segments by these UIDs, so both builders derive them here.
    """
    return result_uids(source, "seg", [f"{model_name}|{model_version}"], source_variant)


def algorithm_uid(name: str, version: str, weights_sha256: str | None = None) -> UID:
    """Device UID of an algorithm (Contributing Equipment, PS3.3 C.12.1): its identity.

    The same model name and version — and, where known, the same weights — always give the
    same UID, on every node, so an archive can group every object one model produced; a
    new version (or retrained weights under an old version) is another device.
    """
    parts = ("algorithm", name, version)
    return derived_uid(*parts, weights_sha256) if weights_sha256 else derived_uid(*parts)


def tracking_uid(source: Dataset, kind: OutputKind, finding: Finding) -> UID:
    """Tracking Unique Identifier (TID 4108) of one finding's measurement group.

    Stable across re-runs so that a later report on the same image and finding can be
    correlated with this one.
    """
    return derived_uid(
        "tracking", str(source.SOPInstanceUID), kind, finding.label.scheme, finding.label.code
    )
