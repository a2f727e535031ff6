"""Scores and labels written straight into the database, for the monitoring tests.

Drift and live performance read ``model_scores`` and ``feedback`` only; these helpers
create the instances those rows belong to and the rows themselves, so a test can state
exactly which distribution a model version "saw" without running a network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.uid import generate_uid
from sqlalchemy.orm import Session

from storage.models import Instance, ModelScore, Series, Study
from storage.registry import record_scores


@dataclass(frozen=True)
class Case:
    instance_id: int
    study_instance_uid: str
    sop_instance_uid: str


def instances(session: Session, count: int) -> list[Case]:
    """``count`` instances, each in its own study."""
    cases = []
    for _ in range(count):
        study = Study(study_instance_uid=generate_uid())
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_instance_uid=generate_uid(), modality="DX")
        session.add(series)
        session.flush()
        instance = Instance(
            series_id=series.id,
            sop_instance_uid=generate_uid(),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            size_bytes=1,
            sha256="0" * 64,
            spool_path="none",
            calling_ae="TEST",
            called_ae="CXR_AI",
            peer_address="127.0.0.1",
        )
        session.add(instance)
        session.flush()
        cases.append(Case(instance.id, study.study_instance_uid, instance.sop_instance_uid))
    return cases


def scores(
    session: Session,
    cases: Sequence[Case],
    probabilities: Sequence[float | None],
    *,
    model: str,
    version: str,
    finding_code: str,
    role: str = "active",
    threshold: float = 0.5,
    manufacturer: str | None = None,
    ood_distance: float | None = 0.35,
    ood_distances: Sequence[float] | None = None,
) -> None:
    """One score per case (None: not assessed, refused); ``ood_distances`` per case, or
    ``ood_distance`` for all."""
    distances = ood_distances or [ood_distance] * len(cases)
    record_scores(
        session,
        [
            ModelScore(
                instance_id=case.instance_id,
                sop_instance_uid=case.sop_instance_uid,
                study_instance_uid=case.study_instance_uid,
                finding_code=finding_code,
                model=model,
                version=version,
                role=role,
                assessed=p is not None,
                probability=None if p is None else float(p),
                present=None if p is None else p >= threshold,
                threshold=None if p is None else threshold,
                stage=None if p is None else "confirm",
                refused=p is None,
                ood_distance=distance,
                age=3.0,
                sex="F",
                view="AP",
                manufacturer=manufacturer,
                pixel_spacing=0.15,
                photometric="MONOCHROME2",
                bits="8",
            )
            for case, p, distance in zip(cases, probabilities, distances, strict=True)
        ],
    )
