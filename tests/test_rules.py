"""Routing rules: every operator and combinator, ordering, the default rule on real files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    SecondaryCaptureImageStorage,
)

from dicom_node.rules import (
    DEFAULT_RULE,
    PIPELINE_CASCADE,
    PIPELINE_NONE,
    RouteDecision,
    RuleError,
    RuleSet,
    as_number,
    check_rules,
    evaluate,
    load_rules,
    rules_test_report,
)

REPO = Path(__file__).resolve().parents[1]


def dicom_dir() -> Path:
    """The shared real files (``CXR_DATA_DIR`` overrides); missing data fails, never skips."""
    root = Path(os.environ.get("CXR_DATA_DIR", REPO.parent / "shared" / "data"))
    manifest = root / "dicom" / "manifest.csv"
    assert manifest.is_file(), f"shared DICOM data not found at {root}"
    return root / "dicom"


def make_ds(**attributes: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def route(
    match: dict[str, Any] | None,
    ds: Dataset,
    calling: str | None = None,
    called: str | None = None,
) -> RouteDecision:
    rule: dict[str, Any] = {"name": "r", "pipeline": "cxr-cascade"}
    if match is not None:
        rule["match"] = match
    return evaluate(RuleSet.model_validate({"rules": [rule]}), ds, calling, called)


def matches(match: dict[str, Any], ds: Dataset, **aets: str | None) -> bool:
    return route(match, ds, aets.get("calling"), aets.get("called")).rule == "r"


def reason(match: dict[str, Any], ds: Dataset) -> str:
    return route(match, ds).trace[0].reason


# ----------------------------------------------------------------- attribute operators


# pydicom warns about lower-case Code Strings, which these tests use on purpose.
lenient_cs = pytest.mark.filterwarnings("ignore:Invalid value for VR CS")


@lenient_cs
class TestEquals:
    def test_case_insensitive_by_default_and_padding_ignored(self) -> None:
        ds = make_ds(BodyPartExamined="Chest ")
        assert matches({"attribute": "BodyPartExamined", "equals": "CHEST"}, ds)

    def test_case_sensitive_on_request(self) -> None:
        ds = make_ds(BodyPartExamined="Chest")
        cond = {"attribute": "BodyPartExamined", "equals": "CHEST", "case_sensitive": True}
        assert not matches(cond, ds)
        assert matches({**cond, "equals": "Chest"}, ds)

    def test_numbers_compare_numerically(self) -> None:
        ds = make_ds(Rows=1024, SliceThickness="2.50")
        assert matches({"attribute": "Rows", "equals": 1024}, ds)
        assert matches({"attribute": "Rows", "equals": "1024"}, ds)
        assert matches({"attribute": "SliceThickness", "equals": 2.5}, ds)
        assert not matches({"attribute": "Rows", "equals": 512}, ds)

    def test_any_value_of_a_multivalued_attribute(self) -> None:
        ds = make_ds(ImageType=["ORIGINAL", "PRIMARY", "", "RT"])
        assert matches({"attribute": "ImageType", "equals": "primary"}, ds)
        assert not matches({"attribute": "ImageType", "equals": "DERIVED"}, ds)

    def test_reason_names_actual_and_expected(self) -> None:
        text = reason({"attribute": "Modality", "equals": "CR"}, make_ds(Modality="MR"))
        assert text == "Modality is 'MR', not 'CR'"

    def test_missing_attribute_does_not_match(self) -> None:
        text = reason({"attribute": "Modality", "equals": "CR"}, make_ds())
        assert text == "Modality is absent"


@lenient_cs
class TestIn:
    def test_membership(self) -> None:
        cond = {"attribute": "Modality", "in": ["CR", "DX"]}
        assert matches(cond, make_ds(Modality="dx"))
        assert not matches(cond, make_ds(Modality="MR"))

    def test_reason(self) -> None:
        cond = {"attribute": "Modality", "in": ["CR", "DX"]}
        assert reason(cond, make_ds(Modality="MR")) == "Modality is 'MR', not in ['CR', 'DX']"
        assert reason(cond, make_ds(Modality="CR")) == "Modality is 'CR', in ['CR', 'DX']"

    def test_mixed_numbers_and_strings(self) -> None:
        assert matches({"attribute": "Rows", "in": [512, "1024"]}, make_ds(Rows=1024))


class TestRegex:
    def test_search_semantics(self) -> None:
        ds = make_ds(StudyDescription="XR CHEST PA AND LATERAL")
        assert matches({"attribute": "StudyDescription", "regex": "chest"}, ds)
        assert not matches({"attribute": "StudyDescription", "regex": "^chest$"}, ds)

    def test_anchored_age(self) -> None:
        cond = {"attribute": "PatientAge", "regex": "^0[1-9][0-9]Y$"}
        assert matches(cond, make_ds(PatientAge="045Y"))
        assert not matches(cond, make_ds(PatientAge="005Y"))
        assert reason(cond, make_ds(PatientAge="005Y")) == (
            "PatientAge '005Y' does not match /^0[1-9][0-9]Y$/"
        )

    def test_case_sensitive_on_request(self) -> None:
        cond = {"attribute": "StudyDescription", "regex": "CHEST", "case_sensitive": True}
        assert not matches(cond, make_ds(StudyDescription="chest"))


class TestRange:
    @pytest.mark.parametrize(
        ("bounds", "rows", "expected"),
        [
            ({"min": 512}, 512, True),  # inclusive
            ({"min": 512}, 511, False),
            ({"max": 2048}, 2048, True),
            ({"max": 2048}, 2049, False),
            ({"min": 512, "max": 2048}, 1024, True),
        ],
    )
    def test_bounds_are_inclusive(self, bounds: dict[str, int], rows: int, expected: bool) -> None:
        assert matches({"attribute": "Rows", "range": bounds}, make_ds(Rows=rows)) is expected

    @pytest.mark.parametrize(
        ("age", "years"),
        [
            ("065Y", 65),
            ("018M", 1.5),
            ("052W", 52 * 7 / 365.25),
            ("010D", 10 / 365.25),
            ("58", 58),
            ("abc", None),
            ("", None),
        ],
    )
    def test_age_strings_in_years(self, age: str, years: float | None) -> None:
        assert as_number(age) == (pytest.approx(years) if years is not None else None)

    def test_age_range(self) -> None:
        cond = {"attribute": "PatientAge", "range": {"min": 18, "max": 80}}
        assert matches(cond, make_ds(PatientAge="065Y"))
        assert not matches(cond, make_ds(PatientAge="006M"))
        assert reason(cond, make_ds(PatientAge="006M")) == (
            "PatientAge '006M' = 0.5, outside [18, 80]"
        )

    def test_decimal_strings_multivalued(self) -> None:
        ds = make_ds(PixelSpacing=["0.139", "0.139"])
        assert matches({"attribute": "PixelSpacing", "range": {"max": 0.2}}, ds)

    def test_non_numeric_does_not_match(self) -> None:
        cond = {"attribute": "Modality", "range": {"min": 1}}
        assert reason(cond, make_ds(Modality="CR")) == "Modality 'CR' is not numeric"


class TestPresence:
    @pytest.mark.parametrize(
        ("ds", "present"),
        [
            (make_ds(BodyPartExamined="CHEST"), True),
            (make_ds(BodyPartExamined=""), False),
            (make_ds(BodyPartExamined="  "), False),
            (make_ds(), False),
        ],
    )
    def test_present_absent(self, ds: Dataset, present: bool) -> None:
        assert matches({"attribute": "BodyPartExamined", "present": True}, ds) is present
        assert matches({"attribute": "BodyPartExamined", "absent": True}, ds) is not present
        assert matches({"attribute": "BodyPartExamined", "present": False}, ds) is not present

    def test_empty_is_explained(self) -> None:
        cond = {"attribute": "BodyPartExamined", "absent": True}
        assert reason(cond, make_ds(BodyPartExamined="")) == "BodyPartExamined is empty"

    def test_sequence_is_present_but_not_comparable(self) -> None:
        ds = make_ds(ViewCodeSequence=[make_ds(CodeValue="R-10214")])
        assert matches({"attribute": "ViewCodeSequence", "present": True}, ds)
        assert "is a sequence" in reason({"attribute": "ViewCodeSequence", "equals": "x"}, ds)


class TestTagSpelling:
    @pytest.mark.parametrize("spelling", ["0018,0015", "(0018,0015)", "00180015", "0018, 0015"])
    def test_tag_forms(self, spelling: str) -> None:
        ds = make_ds(BodyPartExamined="CHEST")
        assert matches({"attribute": spelling, "equals": "CHEST"}, ds)

    def test_private_tag(self) -> None:
        ds = Dataset()
        ds.add_new(0x00091010, "LO", "SITE-A")
        assert matches({"attribute": "0009,1010", "equals": "site-a"}, ds)
        assert reason({"attribute": "0009,1010", "equals": "x"}, ds).startswith("(0009,1010)")


class TestIsImage:
    def test_image_storage_sop_class(self) -> None:
        ds = make_ds(SOPClassUID=SecondaryCaptureImageStorage)
        assert matches({"is_image": True}, ds)

    def test_structured_report_is_not_an_image(self) -> None:
        ds = make_ds(SOPClassUID=ComprehensiveSRStorage, Modality="SR")
        assert not matches({"is_image": True}, ds)
        assert matches({"is_image": False}, ds)
        assert "not an image" in reason({"is_image": True}, ds)

    def test_pixel_data_with_unknown_sop_class(self) -> None:
        ds = make_ds(SOPClassUID="1.2.3.4", PixelData=b"\0\0")
        assert matches({"is_image": True}, ds)

    def test_header_only_read_still_an_image(self) -> None:
        ds = make_ds(
            SOPClassUID="1.2.3.4", Rows=8, Columns=8, PhotometricInterpretation="MONOCHROME2"
        )
        assert matches({"is_image": True}, ds)


# ----------------------------------------------------------------- AE titles, combinators


class TestAeTitles:
    def test_calling_and_called(self) -> None:
        ds = make_ds()
        assert matches({"calling_aet": "MODALITY1"}, ds, calling="MODALITY1 ")
        assert not matches({"calling_aet": "MODALITY1"}, ds, calling="MODALITY2")
        assert matches({"called_aet": ["CXR_AI", "CXR_AI_2"]}, ds, called="CXR_AI_2")

    def test_unknown_title_never_matches(self) -> None:
        decision = route({"calling_aet": "MODALITY1"}, make_ds())
        assert decision.rule is None
        assert decision.trace[0].reason == "calling AE title is unknown, cannot be 'MODALITY1'"

    def test_reason(self) -> None:
        decision = route({"called_aet": "CXR_AI"}, make_ds(), called="OTHER")
        assert decision.trace[0].reason == "called AE title is 'OTHER', not 'CXR_AI'"


class TestCombinators:
    def test_all_stops_at_first_failure(self) -> None:
        cond = {
            "all": [
                {"attribute": "Modality", "equals": "CR"},
                {"attribute": "Rows", "range": {"min": 512}},
            ]
        }
        assert matches(cond, make_ds(Modality="CR", Rows=1024))
        assert reason(cond, make_ds(Modality="CR", Rows=100)) == "Rows 100 outside [512, +inf]"

    def test_any(self) -> None:
        cond = {
            "any": [
                {"attribute": "Modality", "equals": "CR"},
                {"attribute": "Modality", "equals": "DX"},
            ]
        }
        assert matches(cond, make_ds(Modality="DX"))
        assert reason(cond, make_ds(Modality="MR")) == (
            "none of: Modality is 'MR', not 'CR' | Modality is 'MR', not 'DX'"
        )

    def test_not(self) -> None:
        cond = {"not": {"attribute": "ViewPosition", "in": ["LL", "RL"]}}
        assert matches(cond, make_ds(ViewPosition="PA"))
        assert matches(cond, make_ds())
        assert not matches(cond, make_ds(ViewPosition="LL"))
        assert reason(cond, make_ds(ViewPosition="LL")) == "ViewPosition is 'LL', in ['LL', 'RL']"

    def test_deeply_nested(self) -> None:
        cond = {
            "not": {
                "any": [
                    {
                        "all": [
                            {"attribute": "Modality", "equals": "CR"},
                            {"not": {"attribute": "BodyPartExamined", "present": True}},
                        ]
                    },
                    {"not": {"not": {"calling_aet": "BLOCKED"}}},
                ]
            }
        }
        assert not matches(cond, make_ds(Modality="CR"), calling="X")
        assert matches(cond, make_ds(Modality="CR", BodyPartExamined="CHEST"), calling="X")
        assert not matches(cond, make_ds(Modality="MR"), calling="BLOCKED")
        assert matches(cond, make_ds(Modality="MR"), calling="X")

    def test_rule_without_match_matches_everything(self) -> None:
        decision = route(None, make_ds())
        assert decision.rule == "r"
        assert "matches every instance" in decision.reason


# ----------------------------------------------------------------- rule sets


def rule_set(*rules: dict[str, Any], destinations: tuple[str, ...] = ()) -> RuleSet:
    return RuleSet.model_validate({"destinations": destinations, "rules": list(rules)})


class TestOrdering:
    def test_first_match_wins_and_later_rules_are_not_tried(self) -> None:
        rules = rule_set(
            {"name": "mr", "pipeline": "none", "match": {"attribute": "Modality", "equals": "MR"}},
            {
                "name": "cr-ignore",
                "pipeline": "ignore",
                "match": {"attribute": "Modality", "equals": "CR"},
            },
            {
                "name": "cr-cascade",
                "pipeline": "cxr-cascade",
                "match": {"attribute": "Modality", "equals": "CR"},
            },
        )
        decision = evaluate(rules, make_ds(Modality="CR"))
        assert decision.rule == "cr-ignore"
        assert decision.pipeline == PIPELINE_NONE
        assert [(t.rule, t.matched) for t in decision.trace] == [("mr", False), ("cr-ignore", True)]
        assert decision.trace[0].reason == "Modality is 'CR', not 'MR'"

    def test_no_match_means_store_only(self) -> None:
        rules = rule_set(
            {
                "name": "mr",
                "pipeline": "cxr-cascade",
                "match": {"attribute": "Modality", "equals": "MR"},
            }
        )
        decision = evaluate(rules, make_ds(Modality="CR"))
        assert decision.rule is None
        assert decision.pipeline == PIPELINE_NONE
        assert decision.destinations == ()
        assert "no rule matched" in decision.reason


class TestDestinations:
    def test_omitted_and_star_mean_all_configured(self) -> None:
        for extra in ({}, {"destinations": ["*"]}):
            rules = rule_set(
                {"name": "a", "pipeline": "cxr-cascade", **extra}, destinations=("pacs", "archive")
            )
            assert evaluate(rules, make_ds()).destinations == ("pacs", "archive")

    def test_named_subset(self) -> None:
        rules = rule_set(
            {"name": "a", "pipeline": "cxr-cascade", "destinations": ["archive"]},
            destinations=("pacs", "archive"),
        )
        assert evaluate(rules, make_ds()).destinations == ("archive",)

    def test_store_only_pipeline_sends_nowhere(self) -> None:
        rules = rule_set({"name": "a", "pipeline": "none"}, destinations=("pacs",))
        assert evaluate(rules, make_ds()).destinations == ()


TOML_EXAMPLE = """
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104

[[rules]]
name = "adult-chest-dx"
pipeline = "cxr-cascade"
destinations = ["pacs"]
[rules.match]
all = [ { attribute = "Modality", in = ["CR", "DX"] },
        { any = [ { attribute = "BodyPartExamined", equals = "CHEST" },
                  { attribute = "BodyPartExamined", absent = true } ] },
        { not = { attribute = "ViewPosition", in = ["LL", "RL"] } },
        { attribute = "PatientAge", regex = "^0[1-9][0-9]Y$" },
        { attribute = "Rows", range = { min = 512 } },
        { calling_aet = "MODALITY1" }, { called_aet = "CXR_AI" } ]

[[rules]]
name = "everything-else"
pipeline = "ignore"
"""


class TestToml:
    def test_example_loads_and_routes(self) -> None:
        rules = load_rules(tomllib.loads(TOML_EXAMPLE))
        assert rules.destinations == ("pacs",)
        ds = make_ds(Modality="DX", PatientAge="045Y", Rows=2048, ViewPosition="PA")
        decision = evaluate(rules, ds, "MODALITY1", "CXR_AI")
        assert (decision.rule, decision.pipeline, decision.destinations) == (
            "adult-chest-dx",
            PIPELINE_CASCADE,
            ("pacs",),
        )
        other = evaluate(rules, ds, "MODALITY2", "CXR_AI")
        assert (other.rule, other.pipeline) == ("everything-else", PIPELINE_NONE)
        assert other.trace[0].reason == "calling AE title is 'MODALITY2', not 'MODALITY1'"

    def test_no_rules_means_default_rule(self) -> None:
        rules = load_rules({})
        assert rules.effective_rules == (DEFAULT_RULE,)


def _rule(match: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"rules": [{"name": "a", "pipeline": "cxr-cascade", "match": match, **extra}]}


@pytest.mark.parametrize(
    ("config", "where", "message"),
    [
        (
            {
                "destinations": ["pacs"],
                "rules": [{"name": "a", "pipeline": "cxr-cascade", "destinations": ["pcas"]}],
            },
            "rules",
            "rules.0.destinations: rule 'a' names unknown destination 'pcas' (configured: pacs)",
        ),
        (
            _rule({"attribute": "Modality", "regex": "(["}),
            "rules.0.match.attribute.regex",
            "invalid regular expression",
        ),
        (
            _rule({"any": [{"all": []}]}),
            "rules.0.match.any.any.0.all.all",
            "needs at least one condition",
        ),
        (_rule({"any": []}), "rules.0.match.any.any", "needs at least one condition"),
        (
            _rule({"attribute": "Modality", "in": []}),
            "rules.0.match.attribute.in",
            "needs at least one value",
        ),
        (_rule({"attribute": "Modality"}), "rules.0.match.attribute", "needs exactly one operator"),
        (
            _rule({"attribute": "Modality", "equals": "CR", "regex": "C"}),
            "rules.0.match.attribute",
            "found: equals, regex",
        ),
        (
            _rule({"attribute": "Modalty", "equals": "CR"}),
            "rules.0.match.attribute.attribute",
            "neither a DICOM keyword nor a tag",
        ),
        (
            _rule({"attribute": "Modality", "equal": "CR"}),
            "rules.0.match.attribute.equal",
            "Extra inputs",
        ),
        (_rule({"atribute": "Modality"}), "rules.0.match", "a condition needs exactly one"),
        (
            _rule({"attribute": "Rows", "range": {}}),
            "rules.0.match.attribute.range",
            "needs 'min', 'max'",
        ),
        (
            _rule({"attribute": "Rows", "range": {"min": 5, "max": 1}}),
            "rules.0.match.attribute.range",
            "greater than max",
        ),
        (
            _rule({"calling_aet": "X" * 17}),
            "rules.0.match.calling_aet.calling_aet",
            "not a valid AE title",
        ),
        (_rule({}, pipeline="cascade"), "rules.0.pipeline", "'cxr-cascade' or 'none'"),
        (_rule({}, destinations=["*", "pacs"]), "rules.0.destinations", "cannot be combined"),
        (
            {"rules": [{"name": "a", "pipeline": "none"}, {"name": "a", "pipeline": "none"}]},
            "rules",
            "rules.1.name: rule name 'a' is used twice",
        ),
        (_rule({}, outputs=["sr", "pdf"]), "rules.0.outputs", "unknown output type 'pdf'"),
        ({"rules": [{"name": " ", "pipeline": "none"}]}, "rules.0.name", "may not be blank"),
    ],
)
def test_invalid_config_is_rejected_naming_the_key(
    config: dict[str, Any], where: str, message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        RuleSet.model_validate(config)
    errors = [(".".join(map(str, e["loc"])), e["msg"]) for e in info.value.errors()]
    assert any(loc == where and message in msg for loc, msg in errors), errors


def test_check_rules_is_the_one_check_of_names_and_references() -> None:
    rules = RuleSet.model_validate(
        {"rules": [{"name": "a", "pipeline": "none"}, {"name": "b", "pipeline": "none"}]}
    ).rules
    check_rules(rules, [])
    with pytest.raises(RuleError) as info:
        check_rules((rules[0], rules[0]), [])
    assert (info.value.key, info.value.reason) == ("rules.1.name", "rule name 'a' is used twice")
    sending = rule_set({"name": "s", "pipeline": "cxr-cascade"}).rules[0]
    named = sending.model_copy(update={"destinations": ("pacs", "ris")})
    check_rules([named], ["pacs", "ris"])
    with pytest.raises(RuleError) as info:
        check_rules([named], ["pacs"])
    assert info.value.key == "rules.0.destinations"
    assert info.value.reason == "rule 's' names unknown destination 'ris' (configured: pacs)"


class TestOutputs:
    def test_default_outputs(self) -> None:
        rules = rule_set({"name": "all", "pipeline": "cxr-cascade"})
        assert rules.rules[0].outputs == ("sr", "sc", "seg")
        decision = evaluate(rules, make_ds())
        assert decision.outputs == ("sr", "sc", "seg")
        assert DEFAULT_RULE.outputs == ("sr", "sc", "seg")

    def test_rule_names_its_outputs(self) -> None:
        rules = rule_set({"name": "sr-only", "pipeline": "cxr-cascade", "outputs": ["sr"]})
        assert rules.rules[0].outputs == ("sr",)
        assert evaluate(rules, make_ds()).outputs == ("sr",)

    def test_outputs_are_deduplicated_and_may_be_empty(self) -> None:
        rules = rule_set(
            {"name": "a", "pipeline": "cxr-cascade", "outputs": ["sc", " sr", "sc"]},
            {"name": "b", "pipeline": "cxr-cascade", "outputs": []},
        )
        assert [rule.outputs for rule in rules.rules] == [("sc", "sr"), ()]

    def test_pipeline_none_and_no_match_write_nothing(self) -> None:
        ignored = evaluate(rule_set({"name": "skip", "pipeline": "ignore"}), make_ds())
        assert (ignored.rule, ignored.outputs, ignored.destinations) == ("skip", (), ())
        unmatched = evaluate(
            rule_set(
                {"name": "mr", "pipeline": "cxr-cascade", "match": {"is_image": True}},
            ),
            make_ds(),
        )
        assert (unmatched.rule, unmatched.outputs) == (None, ())

    def test_unknown_output_names_the_key(self) -> None:
        with pytest.raises(ValidationError) as info:
            rule_set(
                {"name": "a", "pipeline": "cxr-cascade"},
                {"name": "b", "pipeline": "none", "outputs": ["sr", "dicom-seg"]},
            )
        (error,) = info.value.errors()
        assert error["loc"] == ("rules", 1, "outputs")
        assert "unknown output type 'dicom-seg' (known: pm, sc, seg, sr)" in error["msg"]


# ----------------------------------------------------------------- default rule, real files


def manifest() -> list[dict[str, str]]:
    with (dicom_dir() / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


# CHEST or empty Body Part Examined on a CR/DX image → cascade; everything else → no match.
DEFAULT_EXPECTED = {
    "dental-cr-modality-lut-jpeglossless.dcm": PIPELINE_CASCADE,  # CR, body part empty
    "dog-thorax-dx-lateral.dcm": PIPELINE_NONE,  # THORAX is not CHEST
    "example-tid1500-sr.dcm": PIPELINE_NONE,  # not an image
    "nih-00000001_000-dx-sc.dcm": PIPELINE_CASCADE,  # SC SOP class, DX, body part empty
    "rg1-chest-cr-mono1-j2k.dcm": PIPELINE_CASCADE,
    "rg1-chest-cr-mono1-jpegls-near.dcm": PIPELINE_CASCADE,
    "rg2-hip-cr-jpegextended.dcm": PIPELINE_NONE,
    "rg2-hip-cr-jpeglossless.dcm": PIPELINE_NONE,
    "rg3-tibia-cr-j2k-lossless.dcm": PIPELINE_NONE,
    "siim-cr-jpegbaseline-mono1-header.dcm": PIPELINE_CASCADE,
    "siim-cr-jpegbaseline.dcm": PIPELINE_CASCADE,
}


def test_expectations_cover_the_manifest() -> None:
    assert {row["file"] for row in manifest()} == set(DEFAULT_EXPECTED)


@pytest.mark.parametrize("name", sorted(DEFAULT_EXPECTED))
def test_default_rule_on_real_files(name: str) -> None:
    ds = pydicom.dcmread(dicom_dir() / name, stop_before_pixels=True)
    decision = evaluate(RuleSet(destinations=("pacs", "ris")), ds, "ANY", "CXR_AI")
    assert decision.pipeline == DEFAULT_EXPECTED[name]
    assert decision.default_rule
    if decision.pipeline == PIPELINE_CASCADE:
        assert decision.rule == DEFAULT_RULE.name
        assert decision.destinations == ("pacs", "ris")
    else:
        assert decision.rule is None
        assert decision.destinations == ()


def test_default_rule_reasons_on_real_files() -> None:
    folder = dicom_dir()
    hip_file = folder / "rg2-hip-cr-jpeglossless.dcm"
    hip = evaluate(RuleSet(), pydicom.dcmread(hip_file, stop_before_pixels=True))
    assert hip.reason.startswith("no rule matched")
    assert "BodyPartExamined is 'HIP', not 'CHEST'" in hip.reason
    sr = evaluate(RuleSet(), pydicom.dcmread(folder / "example-tid1500-sr.dcm"))
    assert "not an image (SOP class 'Comprehensive 3D SR Storage'" in sr.trace[0].reason
    nih = evaluate(RuleSet(), pydicom.dcmread(folder / "nih-00000001_000-dx-sc.dcm"))
    assert "Secondary Capture Image Storage" in nih.reason
    assert "BodyPartExamined is absent" in nih.reason


def test_rules_test_report(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    folder = dicom_dir()
    paths = [folder / "siim-cr-jpegbaseline.dcm", folder / "rg2-hip-cr-jpeglossless.dcm", junk]
    report = rules_test_report(paths, None, ["pacs"], calling_aet="MOD", called_aet="CXR_AI")
    json.dumps(report)  # plain data
    assert [entry["pipeline"] for entry in report] == [PIPELINE_CASCADE, PIPELINE_NONE, None]
    assert report[0]["rule"] == DEFAULT_RULE.name
    assert report[0]["destinations"] == ["pacs"]
    assert report[0]["outputs"] == ["sr", "sc", "seg"]
    assert report[1]["outputs"] == [] and report[2]["outputs"] == []
    assert report[1]["trace"][0]["matched"] is False
    assert report[2]["error"].startswith("not a DICOM file")


def test_rules_test_report_with_rule_tables() -> None:
    path = dicom_dir() / "rg2-hip-cr-jpeglossless.dcm"
    tables = [
        {
            "name": "hips",
            "pipeline": "ignore",
            "match": {"attribute": "BodyPartExamined", "equals": "HIP"},
        }
    ]
    (entry,) = rules_test_report([path], tables, [])
    assert (entry["rule"], entry["pipeline"]) == ("hips", PIPELINE_NONE)


# ----------------------------------------------------------------- never raises


EVERY_OPERATOR = RuleSet.model_validate(
    {
        "rules": [
            {"name": f"r{index}", "pipeline": "cxr-cascade", "match": match}
            for index, match in enumerate(
                [
                    {"attribute": "Modality", "in": ["CR", "DX", 5]},
                    {"attribute": "Modality", "equals": 1.5},
                    {"attribute": "BodyPartExamined", "regex": "^CH"},
                    {"attribute": "PatientAge", "range": {"min": 18, "max": 90}},
                    {"attribute": "Rows", "range": {"min": 512}},
                    {"attribute": "ViewPosition", "absent": True},
                    {"is_image": True},
                    {
                        "not": {
                            "any": [
                                {"calling_aet": "A"},
                                {"attribute": "SOPClassUID", "present": True},
                            ]
                        }
                    },
                ]
            )
        ]
    }
)

KEYWORDS = ["Modality", "BodyPartExamined", "PatientAge", "Rows", "ViewPosition", "SOPClassUID"]
VRS = ["CS", "DS", "IS", "AS", "US", "UL", "FD", "SQ", "PN", "UI", "OB", "UN", "LO", "DA"]

values = st.one_of(
    st.none(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.lists(st.one_of(st.text(max_size=8), st.integers(), st.floats()), max_size=4),
)


@st.composite
def raw_datasets(draw: st.DrawFn) -> Dataset:
    """Data sets as a network peer could send them: any VR, any bytes, undecoded."""
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    for keyword in draw(st.lists(st.sampled_from(KEYWORDS), unique=True)):
        tag = Tag(keyword)
        data = draw(st.binary(max_size=24))
        vr = draw(st.sampled_from(VRS))
        elements[tag] = RawDataElement(tag, vr, len(data), data, 0, draw(st.booleans()), True)
    return Dataset(elements)


@st.composite
def python_datasets(draw: st.DrawFn) -> Dataset:
    """Data sets built in code with arbitrary Python values behind the elements."""
    ds = Dataset()
    for keyword in draw(st.lists(st.sampled_from(KEYWORDS), unique=True)):
        ds.add_new(Tag(keyword), draw(st.sampled_from(VRS[:8])), None)
        ds[Tag(keyword)]._value = draw(values)  # bypass validation on purpose
    return ds


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ds=st.one_of(raw_datasets(), python_datasets()),
    calling=st.one_of(st.none(), st.text(max_size=20)),
    called=st.one_of(st.none(), st.text(max_size=20)),
)
def test_evaluation_never_raises(ds: Dataset, calling: str | None, called: str | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rules in (EVERY_OPERATOR, RuleSet()):
            decision = evaluate(rules, ds, calling, called)
            assert decision.pipeline in (PIPELINE_CASCADE, PIPELINE_NONE)
            assert all("internal error" not in t.reason for t in decision.trace), decision


def test_sop_class_named_computed_radiography_is_an_image() -> None:
    ds = make_ds(SOPClassUID=ComputedRadiographyImageStorage, Modality="CR")
    assert evaluate(RuleSet(), ds).rule == DEFAULT_RULE.name


# --------------------------------------------------------------------------- rules test CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def test_rules_test_cli_names_the_matching_rule_and_why_others_did_not(
    tmp_path: Path, data_dir: Path
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
        '[[rules]]\nname = "research"\npipeline = "none"\n'
        '[rules.match]\ncalling_aet = "RESEARCH"\n'
        '[[rules]]\nname = "chest"\npipeline = "cxr-cascade"\ndestinations = ["pacs"]\n'
        '[rules.match]\nattribute = "BodyPartExamined"\nequals = "CHEST"\n'
    )
    chest = data_dir / "dicom" / "siim-cr-jpegbaseline.dcm"
    hip = data_dir / "dicom" / "rg2-hip-cr-jpegextended.dcm"
    result = _cli(
        "rules",
        "test",
        str(chest),
        str(hip),
        "--json",
        "--config",
        str(config),
        "--calling-aet",
        "CR_ROOM_1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)
    assert (first["rule"], first["pipeline"], first["destinations"]) == (
        "chest",
        "cxr-cascade",
        ["pacs"],
    )
    assert first["trace"][0] == {
        "rule": "research",
        "matched": False,
        "reason": "calling AE title is 'CR_ROOM_1', not 'RESEARCH'",
    }
    assert second["rule"] is None and "HIP" in second["trace"][1]["reason"]
    research = _cli(
        "rules",
        "test",
        str(chest),
        "--json",
        "--config",
        str(config),
        "--calling-aet",
        "RESEARCH",
        cwd=tmp_path,
    )
    assert json.loads(research.stdout)[0]["rule"] == "research"
    human = _cli("rules", "test", str(chest), "--config", str(config), cwd=tmp_path)
    assert human.returncode == 0 and "rule chest" in human.stdout


def test_rules_test_cli_uses_the_default_rule_without_configuration(
    tmp_path: Path, data_dir: Path
) -> None:
    files = sorted((data_dir / "dicom").glob("*.dcm"))
    result = _cli("rules", "test", *map(str, files), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    routed = {Path(r["file"]).name: r["rule"] for r in json.loads(result.stdout)}
    assert routed["rg1-chest-cr-mono1-j2k.dcm"] == "default-chest-cr-dx"
    assert routed["nih-00000001_000-dx-sc.dcm"] == "default-chest-cr-dx"  # DX, no body part
    assert routed["rg2-hip-cr-jpegextended.dcm"] is None
    assert routed["example-tid1500-sr.dcm"] is None
