"""Declarative routing: which pipeline an instance goes through and where its results go.

Rules are data, never code: a ``[[rules]]`` table names a pipeline, the destinations for
its results and a ``match`` condition tree over the instance's attributes and the
association's AE titles. Nothing is ever ``eval``-ed. Rules are tried in the order they
are written and the **first match wins**; when no rule is configured the built-in
:data:`DEFAULT_RULE` applies (CR/DX images of the chest, or with Body Part Examined empty,
go through the full cascade and their results go to every configured destination).
An empty rule list counts as "none configured"; to analyse nothing, end the list with a
catch-all rule (no ``match``) whose pipeline is ``"none"``. When no rule matches, the
instance is stored but not analysed (pipeline ``"none"``, no destinations); a rule with
pipeline ``"none"`` produces nothing, so it sends nowhere either; ``destinations = []``
analyses but sends nowhere (results only on the dashboard). ``outputs`` names the output
types written for each analysed image (:mod:`dicom_node.results.registry`; default
``["sr", "sc"]``).

TOML schema (one table per rule)::

    [[rules]]
    name = "adult-chest-dx"            # unique, shown in explanations and the dashboard
    pipeline = "cxr-cascade"           # "cxr-cascade" | "none" (alias "ignore": store only)
    destinations = ["pacs"]            # names of [[destinations]]; omitted or ["*"] = all
    outputs = ["sr", "sc"]             # output types written per image; omitted = sr, sc
    description = "optional free text"

    [rules.match]                      # omitted = matches every instance
    all = [ { attribute = "Modality", in = ["CR", "DX"] },
            { any = [ { attribute = "BodyPartExamined", equals = "CHEST" },
                      { attribute = "BodyPartExamined", absent = true } ] },
            { not = { attribute = "ViewPosition", in = ["LL", "RL"] } },
            { attribute = "PatientAge", regex = "^0[1-9][0-9]Y$" },
            { attribute = "Rows", range = { min = 512 } },
            { is_image = true },
            { calling_aet = "MODALITY1" }, { called_aet = ["CXR_AI", "CXR_AI_2"] } ]

A condition is a table with exactly one of these keys:

``attribute``
    A DICOM attribute by keyword (``BodyPartExamined``) or tag (``"0018,0015"``,
    ``"(0018,0015)"``, ``"00180015"``), with exactly one operator:

    * ``equals`` — a string or a number. Strings compare after stripping the padding
      spaces of PS3.5 §6.2 and, unless ``case_sensitive = true``, **case-insensitively**:
      Code Strings are upper case by definition (PS3.5 Table 6.2-1) but devices in the
      field send ``"Chest"``, and a routing miss is worse than a lenient match. Numbers
      compare numerically (``{ attribute = "Rows", equals = 1024 }``).
    * ``in`` — a non-empty list of such values; matches if the value equals any of them.
    * ``regex`` — a Python regular expression applied with :func:`re.search` (anchor it
      with ``^…$`` for a whole-value match), case-insensitive unless ``case_sensitive``.
    * ``range`` — ``{ min = …, max = … }`` (inclusive, at least one bound) on the numeric
      value: binary numbers, DS/IS strings, and Age Strings (AS, PS3.5 Table 6.2-1:
      ``"065Y"``, ``"018M"``, ``"003W"``, ``"010D"``) converted to **years**; a bare
      number such as ``"58"`` is taken as it is.
    * ``present = true`` / ``absent = true`` — *absent* means not in the data set **or**
      zero-length (a Type 2 attribute sent empty, PS3.5 §7.4); ``present = false`` is
      ``absent = true``.

    Multi-valued attributes (VM > 1, e.g. Image Type) match when **any** value matches.
``calling_aet`` / ``called_aet``
    The association's AE titles: one title or a list, compared exactly after stripping
    spaces (PS3.5 Table 6.2-1, AE). Unknown titles (e.g. a file read from disk) never match.
``is_image``
    ``true`` when the instance is an image: its SOP class is an *Image Storage* SOP class
    (PS3.6 Annex A names, e.g. *Secondary Capture Image Storage*), or it carries Pixel
    Data, or the Image Pixel Module (Rows, Columns, Photometric Interpretation; PS3.3
    C.7.6.3) — the last so that headers read with ``stop_before_pixels`` still qualify.
``all`` / ``any``
    A non-empty list of conditions (logical and / or), nested to any depth.
``not``
    One condition, negated.

Explanations contain attribute values (to say *why*), so they are meant for the operator's
screen (``dicom-node rules test``) and are never logged by this module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import UID

from dicom_node.files import NotDicomError, read_dicom_file
from dicom_node.results.registry import DEFAULT_OUTPUTS, check_output_names

PIPELINE_CASCADE = "cxr-cascade"
PIPELINE_NONE = "none"
PipelineName = Literal["cxr-cascade", "none"]
PIPELINE_ALIASES: Mapping[str, str] = {"ignore": PIPELINE_NONE}
ALL_DESTINATIONS = "*"

Scalar = StrictStr | StrictInt | StrictFloat
_MAX_SHOWN = 64  # characters of a value quoted in an explanation
_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel, Float, Double Float
_IMAGE_PIXEL_KEYWORDS = ("Rows", "Columns", "PhotometricInterpretation")
_AGE = re.compile(r"(\d{1,3})\s*([DWMY])", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
_TAG_TEXT = re.compile(r"\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?")


class Outcome(NamedTuple):
    """Result of one condition: whether it holds and a sentence saying why."""

    matched: bool
    reason: str


class _Context(NamedTuple):
    dataset: Dataset
    calling_aet: str | None
    called_aet: str | None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --------------------------------------------------------------------------- values


def _shown(value: object) -> str:
    """``repr`` of a value, shortened so one explanation stays one readable line."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 4] + "...'"


def _flatten(value: object) -> list[object]:
    """The element value as a list of non-empty scalars (strings stripped, PS3.5 §6.2)."""
    if value is None:
        return []
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("latin-1")
    if isinstance(value, MultiValue | list | tuple):
        return [item for part in value for item in _flatten(part)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [value]
    text = str(value).strip(" \x00")
    return [text] if text else []


def as_number(value: object) -> float | None:
    """Numeric reading of a value: numbers, DS/IS text, or an Age String in years.

    Age Strings (AS, PS3.5 Table 6.2-1) are ``nnnD|W|M|Y``; they are converted to years
    so that one rule (``range = { min = 18 }``) works whatever unit the modality chose.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = _finite(value)
    else:
        text = str(value).strip(" \x00")
        age = _AGE.fullmatch(text)
        if age:
            return int(age.group(1)) * _AGE_UNIT_YEARS[age.group(2).upper()]
        try:
            number = _finite(float(text))
        except ValueError:
            return None
    return number


def _finite(value: int | float) -> float | None:
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


class _Read(NamedTuple):
    """What the data set holds for one attribute."""

    state: Literal["absent", "empty", "sequence", "unreadable", "value"]
    values: list[object]
    detail: str = ""


def _read(dataset: Dataset, tag: BaseTag) -> _Read:
    """Read one attribute without ever raising: malformed values become 'unreadable'."""
    try:
        if tag not in dataset:
            return _Read("absent", [])
        value = dataset[tag].value
        if isinstance(value, DicomSequence):
            return _Read("sequence", [], f"{len(value)} item(s)")
        values = _flatten(value)
    except Exception as exc:  # any decoding failure is a non-match
        return _Read("unreadable", [], type(exc).__name__)
    return _Read("value", values) if values else _Read("empty", [])


def _describe_missing(label: str, read: _Read) -> str:
    if read.state == "sequence":
        return f"{label} is a sequence ({read.detail}), not a comparable value"
    if read.state == "unreadable":
        return f"{label} could not be read ({read.detail})"
    return f"{label} is {read.state}"


def _show_values(values: list[object]) -> str:
    return _shown(values[0]) if len(values) == 1 else _shown(values)


def parse_attribute(text: str) -> BaseTag:
    """Tag for a keyword (``BodyPartExamined``) or tag text (``0018,0015``, ``(0018,0015)``)."""
    text = text.strip()
    tag = tag_for_keyword(text)
    if tag is not None:
        return BaseTag(tag)
    hexed = _TAG_TEXT.fullmatch(text)
    if hexed is None:
        raise ValueError(f"{text!r} is neither a DICOM keyword nor a tag like '0018,0015'")
    return BaseTag(int(hexed.group(1) + hexed.group(2), 16))


def attribute_label(tag: BaseTag) -> str:
    """Keyword if the dictionary knows the tag, else ``(gggg,eeee)``."""
    return keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})"


# --------------------------------------------------------------------------- conditions


class Range(_Model):
    """Inclusive numeric bounds; at least one of ``min`` and ``max``."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check_bounds(self) -> Range:
        if self.min is None and self.max is None:
            raise ValueError("range needs 'min', 'max' or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"range min {self.min} is greater than max {self.max}")
        return self

    def contains(self, number: float) -> bool:
        return (self.min is None or number >= self.min) and (self.max is None or number <= self.max)

    def __str__(self) -> str:
        low = "-inf" if self.min is None else f"{self.min:g}"
        high = "+inf" if self.max is None else f"{self.max:g}"
        return f"[{low}, {high}]"


_OPERATORS = ("equals", "in_", "regex", "range", "present", "absent")


class AttributeCondition(_Model):
    """A test on one DICOM attribute (see the module docstring for the semantics)."""

    attribute: str
    equals: Scalar | None = None
    in_: tuple[Scalar, ...] | None = Field(None, alias="in")
    regex: str | None = None
    range: Range | None = None
    present: bool | None = None
    absent: bool | None = None
    case_sensitive: bool = False

    @field_validator("attribute")
    @classmethod
    def _check_attribute(cls, value: str) -> str:
        return attribute_label(parse_attribute(value))

    @field_validator("in_")
    @classmethod
    def _check_in(cls, value: tuple[Scalar, ...] | None) -> tuple[Scalar, ...] | None:
        if value is not None and not value:
            raise ValueError("'in' needs at least one value")
        return value

    @field_validator("regex")
    @classmethod
    def _check_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_operator(self) -> AttributeCondition:
        given = [name.rstrip("_") for name in _OPERATORS if getattr(self, name) is not None]
        if len(given) != 1:
            found = ", ".join(given) or "none"
            raise ValueError(
                f"attribute {self.attribute!r} needs exactly one operator of equals, in, "
                f"regex, range, present, absent (found: {found})"
            )
        return self

    @property
    def tag(self) -> BaseTag:
        return parse_attribute(self.attribute)

    def evaluate(self, context: _Context) -> Outcome:
        read = _read(context.dataset, self.tag)
        if self.present is not None or self.absent is not None:
            return self._presence(read)
        if read.state != "value":
            return Outcome(False, _describe_missing(self.attribute, read))
        if self.equals is not None:
            return self._membership(read.values, (self.equals,))
        if self.in_ is not None:
            return self._membership(read.values, self.in_)
        if self.regex is not None:
            return self._regex(read.values, self.regex)
        assert self.range is not None  # guaranteed by _one_operator
        return self._range(read.values, self.range)

    def _presence(self, read: _Read) -> Outcome:
        want_present = self.present is True or self.absent is False
        is_present = read.state in ("value", "sequence", "unreadable")
        if read.state == "value":
            reason = f"{self.attribute} is present ({_show_values(read.values)})"
        else:
            reason = _describe_missing(self.attribute, read)
        return Outcome(is_present == want_present, reason)

    def _same(self, actual: object, expected: Scalar) -> bool:
        if isinstance(expected, str):
            left, right = str(actual).strip(), expected.strip()
            if not self.case_sensitive:
                left, right = left.casefold(), right.casefold()
            return left == right
        number = as_number(actual)
        return number is not None and number == expected

    def _membership(self, values: list[object], expected: tuple[Scalar, ...]) -> Outcome:
        matched = any(self._same(value, item) for value in values for item in expected)
        shown = _show_values(values)
        if self.equals is None:
            verdict = (", in " if matched else ", not in ") + _shown(list(expected))
        elif matched:
            target = _shown(expected[0])
            verdict = "" if target == shown else f", equal to {target}"
        else:
            verdict = f", not {_shown(expected[0])}"
        return Outcome(matched, f"{self.attribute} is {shown}{verdict}")

    def _regex(self, values: list[object], pattern: str) -> Outcome:
        flags = 0 if self.case_sensitive else re.IGNORECASE
        compiled = re.compile(pattern, flags)
        matched = any(compiled.search(str(value)) for value in values)
        verdict = "matches" if matched else "does not match"
        return Outcome(matched, f"{self.attribute} {_show_values(values)} {verdict} /{pattern}/")

    def _range(self, values: list[object], bounds: Range) -> Outcome:
        numbers = [number for value in values if (number := as_number(value)) is not None]
        shown = _show_values(values)
        if not numbers:
            return Outcome(False, f"{self.attribute} {shown} is not numeric")
        matched = any(bounds.contains(number) for number in numbers)
        where = "within" if matched else "outside"
        if all(isinstance(value, int | float) for value in values):
            return Outcome(matched, f"{self.attribute} {shown} {where} {bounds}")
        reading = ", ".join(f"{number:g}" for number in numbers)
        return Outcome(matched, f"{self.attribute} {shown} = {reading}, {where} {bounds}")


def _ae_titles(value: object) -> object:
    """One title or a list; each stripped and checked against PS3.5 Table 6.2-1 (AE)."""
    titles = [value] if isinstance(value, str) else value
    if not isinstance(titles, list | tuple) or not titles:
        raise ValueError("expected an AE title or a non-empty list of AE titles")
    cleaned: list[str] = []
    for title in titles:
        if not isinstance(title, str):
            raise ValueError(f"AE title {title!r} is not a string")
        text = title.strip(" ")
        if not 1 <= len(text) <= 16 or any(ch == "\\" or not " " <= ch <= "~" for ch in text):
            raise ValueError(f"{title!r} is not a valid AE title (1-16 printable characters)")
        cleaned.append(text)
    return tuple(cleaned)


AeTitles = Annotated[tuple[str, ...], BeforeValidator(_ae_titles)]


def _ae_outcome(label: str, actual: str | None, expected: tuple[str, ...]) -> Outcome:
    wanted = _shown(expected[0]) if len(expected) == 1 else f"one of {_shown(list(expected))}"
    if actual is None:
        return Outcome(False, f"{label} is unknown, cannot be {wanted}")
    title = actual.strip(" ")
    if title in expected:
        return Outcome(True, f"{label} is {title!r}")
    return Outcome(False, f"{label} is {title!r}, not {wanted}")


class CallingAetCondition(_Model):
    """The association's Calling AE Title (the sender) is one of the given titles."""

    calling_aet: AeTitles

    def evaluate(self, context: _Context) -> Outcome:
        return _ae_outcome("calling AE title", context.calling_aet, self.calling_aet)


class CalledAetCondition(_Model):
    """The association's Called AE Title (the title the sender addressed us by)."""

    called_aet: AeTitles

    def evaluate(self, context: _Context) -> Outcome:
        return _ae_outcome("called AE title", context.called_aet, self.called_aet)


def image_evidence(dataset: Dataset) -> str | None:
    """Why the instance counts as an image, or ``None`` when it does not."""
    try:
        sop_class = UID(str(dataset.get("SOPClassUID", "") or "").strip())
        if sop_class and "Image Storage" in sop_class.name:
            return f"SOP class {sop_class.name!r} is an image storage SOP class"
        if any(tag in dataset for tag in _PIXEL_DATA_TAGS):
            return "Pixel Data is present"
        if all(keyword in dataset for keyword in _IMAGE_PIXEL_KEYWORDS):
            return "the Image Pixel Module is present"
    except Exception:  # a malformed header is simply not an image
        return None
    return None


class IsImageCondition(_Model):
    """The instance is (``true``) or is not (``false``) an image."""

    is_image: bool

    def evaluate(self, context: _Context) -> Outcome:
        evidence = image_evidence(context.dataset)
        if evidence is None:
            reason = f"not an image (SOP class {_sop_class_name(context.dataset)}, no pixels)"
            return Outcome(not self.is_image, reason)
        return Outcome(self.is_image, evidence)


def _sop_class_name(dataset: Dataset) -> str:
    try:
        value = str(dataset.get("SOPClassUID", "") or "").strip()
    except Exception:
        return "unreadable"
    return repr(UID(value).name) if value else "absent"


def _non_empty(value: list[Any]) -> list[Any]:
    if not value:
        raise ValueError("needs at least one condition")
    return value


class AllCondition(_Model):
    """Every sub-condition holds (evaluated in order, stopping at the first failure)."""

    all_of: Annotated[list[Condition], AfterValidator(_non_empty)] = Field(alias="all")

    def evaluate(self, context: _Context) -> Outcome:
        reasons: list[str] = []
        for condition in self.all_of:
            outcome = condition.evaluate(context)
            if not outcome.matched:
                return outcome
            reasons.append(outcome.reason)
        return Outcome(True, "; ".join(reasons))


class AnyCondition(_Model):
    """At least one sub-condition holds (evaluated in order, stopping at the first match)."""

    any_of: Annotated[list[Condition], AfterValidator(_non_empty)] = Field(alias="any")

    def evaluate(self, context: _Context) -> Outcome:
        reasons: list[str] = []
        for condition in self.any_of:
            outcome = condition.evaluate(context)
            if outcome.matched:
                return outcome
            reasons.append(outcome.reason)
        return Outcome(False, "none of: " + " | ".join(reasons))


class NotCondition(_Model):
    """The sub-condition does not hold; its own reason already says what was found."""

    negated: Condition = Field(alias="not")

    def evaluate(self, context: _Context) -> Outcome:
        outcome = self.negated.evaluate(context)
        return Outcome(not outcome.matched, outcome.reason)


_CONDITION_KEYS = ("all", "any", "not", "attribute", "calling_aet", "called_aet", "is_image")
_MODEL_KEYS: dict[type[BaseModel], str] = {
    AllCondition: "all",
    AnyCondition: "any",
    NotCondition: "not",
    AttributeCondition: "attribute",
    CallingAetCondition: "calling_aet",
    CalledAetCondition: "called_aet",
    IsImageCondition: "is_image",
}


def _condition_kind(value: Any) -> str | None:
    """Which condition a TOML table is, from the one key that identifies it."""
    if isinstance(value, Mapping):
        kinds = [key for key in _CONDITION_KEYS if key in value]
        return kinds[0] if len(kinds) == 1 else None
    return _MODEL_KEYS.get(type(value))


Condition = Annotated[
    Annotated[AllCondition, Tag("all")]
    | Annotated[AnyCondition, Tag("any")]
    | Annotated[NotCondition, Tag("not")]
    | Annotated[AttributeCondition, Tag("attribute")]
    | Annotated[CallingAetCondition, Tag("calling_aet")]
    | Annotated[CalledAetCondition, Tag("called_aet")]
    | Annotated[IsImageCondition, Tag("is_image")],
    Discriminator(
        _condition_kind,
        custom_error_type="invalid_condition",
        custom_error_message="a condition needs exactly one of the keys "
        + ", ".join(_CONDITION_KEYS),
    ),
]

for _model in (AllCondition, AnyCondition, NotCondition):
    _model.model_rebuild()


# --------------------------------------------------------------------------- rules


class Rule(_Model):
    """One ``[[rules]]`` table."""

    name: str = Field(min_length=1)
    pipeline: PipelineName
    destinations: tuple[str, ...] = (ALL_DESTINATIONS,)
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    match: Condition | None = None
    description: str = ""

    @field_validator("name")
    @classmethod
    def _strip_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a rule name may not be blank")
        return value.strip()

    @field_validator("pipeline", mode="before")
    @classmethod
    def _alias_pipeline(cls, value: object) -> object:
        return PIPELINE_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("destinations")
    @classmethod
    def _check_destinations(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(name.strip() for name in value))
        if ALL_DESTINATIONS in names and len(names) > 1:
            raise ValueError("'*' (all destinations) cannot be combined with names")
        if any(not name for name in names):
            raise ValueError("a destination name may not be blank")
        return names

    @field_validator("outputs")
    @classmethod
    def _check_outputs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_output_names(value)

    def evaluate(self, context: _Context) -> Outcome:
        if self.match is None:
            return Outcome(True, "no conditions (matches every instance)")
        return self.match.evaluate(context)

    def resolve_destinations(self, configured: Sequence[str]) -> tuple[str, ...]:
        """Configured names this rule sends to; none when its pipeline produces nothing."""
        if self.pipeline == PIPELINE_NONE:
            return ()
        if self.destinations == (ALL_DESTINATIONS,):
            return tuple(configured)
        return self.destinations

    def resolve_outputs(self) -> tuple[str, ...]:
        """Output types written for a matched image; none when its pipeline produces nothing."""
        return () if self.pipeline == PIPELINE_NONE else self.outputs


class RuleError(ValueError):
    """Rules that are invalid together (names, references); ``key`` names the entry."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def check_rules(rules: Sequence[Rule], destinations: Sequence[str]) -> None:
    """Rule names are unique and every destination a rule names is one of ``destinations``.

    The one check of these, for the configuration and :class:`RuleSet` alike; raises
    :class:`RuleError` naming ``rules.<n>.name`` or ``rules.<n>.destinations``.
    """
    seen: set[str] = set()
    for index, rule in enumerate(rules):
        if rule.name in seen:
            raise RuleError(f"rules.{index}.name", f"rule name {rule.name!r} is used twice")
        seen.add(rule.name)
        unknown = [n for n in rule.destinations if n != ALL_DESTINATIONS and n not in destinations]
        if unknown:
            known = ", ".join(destinations) or "none"
            raise RuleError(
                f"rules.{index}.destinations",
                f"rule {rule.name!r} names unknown destination {unknown[0]!r} "
                f"(configured: {known})",
            )


DEFAULT_RULE = Rule.model_validate(
    {
        "name": "default-chest-cr-dx",
        "pipeline": PIPELINE_CASCADE,
        "destinations": [ALL_DESTINATIONS],
        "description": "built-in: CR/DX images of the chest (or with no body part) "
        "through the full cascade, results to every destination",
        "match": {
            "all": [
                {"is_image": True},
                {"attribute": "Modality", "in": ["CR", "DX"]},
                {
                    "any": [
                        {"attribute": "BodyPartExamined", "equals": "CHEST"},
                        {"attribute": "BodyPartExamined", "absent": True},
                    ]
                },
            ]
        },
    }
)


class RuleSet(_Model):
    """The configured rules together with the destination names they may refer to.

    The names come from validated destinations, whose uniqueness
    :func:`dicom_node.dispatch.check_unique_names` checks. An empty ``rules`` list means
    "none configured": :data:`DEFAULT_RULE` applies.
    """

    destinations: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()

    @field_validator("rules")
    @classmethod
    def _check_rules(cls, rules: tuple[Rule, ...], info: ValidationInfo) -> tuple[Rule, ...]:
        check_rules(rules, info.data.get("destinations", ()))
        return rules

    @property
    def effective_rules(self) -> tuple[Rule, ...]:
        return self.rules or (DEFAULT_RULE,)


def load_rules(
    config: Mapping[str, Any], destination_names: Iterable[str] | None = None
) -> RuleSet:
    """Build a :class:`RuleSet` from a parsed TOML document (``[[rules]]``, ``[[destinations]]``).

    ``destination_names`` overrides the names read from ``[[destinations]]`` tables.
    Raises :class:`pydantic.ValidationError` whose locations name the offending key.
    """
    if destination_names is None:
        tables = config.get("destinations") or []
        destination_names = [str(t.get("name")) for t in tables if isinstance(t, Mapping)]
    return RuleSet.model_validate(
        {"destinations": list(destination_names), "rules": config.get("rules") or []}
    )


# --------------------------------------------------------------------------- evaluation


class RuleTrace(_Model):
    """One rule tried: whether it matched and why."""

    rule: str
    matched: bool
    reason: str


class RouteDecision(_Model):
    """Where one instance goes: the matched rule, its pipeline, the output types it writes
    and the destinations they go to (no outputs and no destinations for pipeline "none")."""

    rule: str | None
    pipeline: PipelineName
    destinations: tuple[str, ...]
    outputs: tuple[str, ...] = ()
    reason: str
    trace: tuple[RuleTrace, ...]
    default_rule: bool = False


def _evaluate_rule(rule: Rule, context: _Context) -> Outcome:
    """Safety net: a bug in one rule must not stop reception; it simply does not match."""
    try:
        return rule.evaluate(context)
    except Exception as exc:
        return Outcome(False, f"internal error while evaluating ({type(exc).__name__})")


def evaluate(
    rules: RuleSet,
    dataset: Dataset,
    calling_aet: str | None = None,
    called_aet: str | None = None,
) -> RouteDecision:
    """Route one instance: the first matching rule wins; never raises.

    The trace holds every rule tried, i.e. up to and including the first match.
    """
    context = _Context(dataset, calling_aet, called_aet)
    trace: list[RuleTrace] = []
    for rule in rules.effective_rules:
        outcome = _evaluate_rule(rule, context)
        trace.append(RuleTrace(rule=rule.name, matched=outcome.matched, reason=outcome.reason))
        if outcome.matched:
            return RouteDecision(
                rule=rule.name,
                pipeline=rule.pipeline,
                destinations=rule.resolve_destinations(rules.destinations),
                outputs=rule.resolve_outputs(),
                reason=f"rule {rule.name!r} matched: {outcome.reason}",
                trace=tuple(trace),
                default_rule=not rules.rules,
            )
    return RouteDecision(
        rule=None,
        pipeline=PIPELINE_NONE,
        destinations=(),
        reason="no rule matched, stored but not analysed: "
        + "; ".join(f"{t.rule!r}: {t.reason}" for t in trace),
        trace=tuple(trace),
        default_rule=not rules.rules,
    )


def rules_test_report(
    paths: Iterable[str | Path],
    rules: RuleSet | Sequence[Rule | Mapping[str, Any]] | None,
    destinations: Iterable[str] = (),
    calling_aet: str | None = None,
    called_aet: str | None = None,
) -> list[dict[str, Any]]:
    """Per-file routing report as plain data (for ``dicom-node rules test FILE...``).

    Headers are read with ``stop_before_pixels`` (routing never needs pixels); a file
    that cannot be read gets an ``error`` entry instead of aborting the report.
    """
    if not isinstance(rules, RuleSet):
        rules = RuleSet.model_validate(
            {"destinations": list(destinations), "rules": list(rules or [])}
        )
    return [_report_one(Path(path), rules, calling_aet, called_aet) for path in paths]


def _report_one(
    path: Path, rules: RuleSet, calling_aet: str | None, called_aet: str | None
) -> dict[str, Any]:
    try:
        dataset = read_dicom_file(path, stop_before_pixels=True)
    except Exception as exc:  # reported per file
        error = (
            str(exc)
            if isinstance(exc, NotDicomError)
            else f"cannot read as DICOM: {type(exc).__name__}: {exc}"
        )
        return {
            "file": str(path),
            "error": error,
            "rule": None,
            "pipeline": None,
            "destinations": [],
            "outputs": [],
            "reason": error,
            "trace": [],
            "default_rule": None,
        }
    decision = evaluate(rules, dataset, calling_aet, called_aet)
    return {"file": str(path), "error": None, **decision.model_dump(mode="json")}
