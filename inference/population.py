"""The intended population of a finding's models, and whether an image belongs to it.

A model answers only inside the population it was validated on. Each finding's screen
bundle declares it in ``metadata.json``::

    "population": {"age_years": [1, 5], "views": ["PA", "AP"],
                   "modalities": ["CR", "DX"], "unknown_age": "not_assessed"}

``age_years`` is inclusive in whole years of age: ``[1, 5]`` admits a child from its first
birthday until the day before its sixth (18 months and 5 years 11 months are in; 10
months and 6 years are out). The age is read from Patient Age (0010,1010), else computed
from Patient's Birth Date and the Study (else Acquisition, else Content) Date. An age
that cannot be established is handled as the bundle says: ``"not_assessed"`` (the
default, and what every shipped bundle declares — a pediatric model applied to an adult
of unknown age is exactly the failure this check exists for) or ``"assess"``.

Outside the population the finding is *not assessed*, with the reason; it gets no
probability, is never ``present`` and never feeds the study priority.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from pydicom.dataset import Dataset

_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}


@dataclass(frozen=True)
class ImageFacts:
    """What the population check reads from a header (None: not known)."""

    age_years: float | None
    view: str | None
    modality: str | None

    @classmethod
    def of(cls, ds: Dataset) -> ImageFacts:
        view = str(ds.get("ViewPosition") or "").strip().upper() or None
        modality = str(ds.get("Modality") or "").strip().upper() or None
        return cls(patient_age_years(ds), view, modality)


UNKNOWN = ImageFacts(None, None, None)


@dataclass(frozen=True)
class Population:
    """Where a finding's models were validated."""

    age_min: float | None = None
    age_max: float | None = None  # inclusive, in whole years
    views: tuple[str, ...] = ()  # empty: any view the header gate admits
    modalities: tuple[str, ...] = ()
    unknown_age: str = "not_assessed"  # or "assess"

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any] | None) -> Population:
        """From a bundle's ``population``; a bundle without one declares no limits."""
        if not meta:
            return cls()
        ages: Sequence[float | None] = meta.get("age_years") or (None, None)
        unknown = str(meta.get("unknown_age", "not_assessed"))
        if unknown not in ("not_assessed", "assess"):
            raise ValueError(f"population.unknown_age must be not_assessed or assess: {unknown}")
        return cls(
            age_min=None if ages[0] is None else float(ages[0]),
            age_max=None if ages[1] is None else float(ages[1]),
            views=tuple(str(v).upper() for v in meta.get("views", ())),
            modalities=tuple(str(m).upper() for m in meta.get("modalities", ())),
            unknown_age=unknown,
        )

    def reason_outside(self, facts: ImageFacts) -> str | None:
        """Why an image is outside the population; None when it is inside."""
        if self.age_min is not None or self.age_max is not None:
            reason = self._age_reason(facts.age_years)
            if reason:
                return reason
        # A view not stated is taken as frontal, as the header gate does (which already
        # refused every lateral or oblique it could recognise): many frontal CRs omit it.
        if self.views and facts.view is not None and facts.view not in self.views:
            return f"view {facts.view} is outside the validated views ({', '.join(self.views)})"
        if self.modalities and facts.modality not in self.modalities:
            shown = facts.modality or "not stated"
            return (
                f"modality {shown} is outside the validated modalities "
                f"({', '.join(self.modalities)})"
            )
        return None

    def _age_reason(self, age: float | None) -> str | None:
        if age is None:
            if self.unknown_age == "assess":
                return None
            return f"patient age unknown; the model was validated on ages {self.age_range}"
        too_young = self.age_min is not None and age < self.age_min
        too_old = self.age_max is not None and age >= self.age_max + 1
        if too_young or too_old:
            return f"patient age {_years(age)} is outside the validated ages {self.age_range}"
        return None

    @property
    def age_range(self) -> str:
        low = "0" if self.age_min is None else f"{self.age_min:g}"
        high = "any" if self.age_max is None else f"{self.age_max:g}"
        return f"{low}–{high} years"


def patient_age_years(ds: Dataset) -> float | None:
    """Age at the study in years: Patient Age, else birth date and study date."""
    age = parse_age_string(str(ds.get("PatientAge") or ""))
    if age is not None:
        return age
    born = _date(ds.get("PatientBirthDate"))
    taken = next(
        (
            d
            for d in (_date(ds.get(k)) for k in ("StudyDate", "AcquisitionDate", "ContentDate"))
            if d is not None
        ),
        None,
    )
    if born is None or taken is None or taken < born:
        return None
    years = (taken - born).days / 365.25
    return years if years <= 130 else None


def parse_age_string(value: str) -> float | None:
    """An Age String (PS3.5 AS, ``nnnD|W|M|Y``) in years; a bare number is read as years
    (some modalities write ``62``); anything else is unknown (None)."""
    match = _AGE.match(value)
    if match is None:
        return None
    number, unit = int(match.group(1)), match.group(2).upper()
    return number * _UNIT_YEARS[unit]


def _date(value: object) -> date | None:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        parsed = date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None
    return None if parsed.year <= 1900 else parsed  # 19000101: a placeholder, not a birth


def _years(age: float) -> str:
    if age >= 2:
        return f"{int(age)} years"
    months = int(age * 12)
    return f"{months} months" if months >= 1 else f"{int(age * 365.25)} days"
