"""The dashboard's models page in a real headless browser (chromium via chromedriver).

A node serving the API gets, through the real storage code (``storage.registry`` for the
scores and the readers' labels), :data:`CASES` images scored today by the shipped
pneumonia confirm model, each labelled by a reader.
The browser opens the dashboard, switches to the models view and must show the shipped
versions in force, the live performance row with exactly the figures
:func:`dicom_node.models.performance.performance` computes from the same database (the
AUROC with its 95 % CI as the page formats it), the "below card" badge those figures
call for, and a drift plot with its level — with no CSP violation and no console error.
Without scores the view shows its empty states instead.
"""

from __future__ import annotations

import random
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.models import registry as model_registry
from dicom_node.models.performance import performance
from storage.db import session_scope
from storage.registry import Label, add_feedback
from tests import test_dashboard
from tests.api_support import TOKEN, VIEWER_TOKEN, ApiNode
from tests.models_support import instances, scores
from tests.test_dashboard import console, csp_violations, wait_for

# The dashboard test's fixtures: a real Chromium, and a node serving the API (per backend).
browser = test_dashboard.browser
node = test_dashboard.node

MODEL = "cxr_pneumonia_confirm_resnet18"
VERSION = "1.0.0"
PNEUMONIA = "233604007"
THRESHOLD = 0.73072  # the bundle's threshold for pneumonia
CASES = 120
SHIPPED = {
    ("pneumonia", "screen"): "cxr_pneumonia_screen_mobilenetv3",
    ("pneumonia", "confirm"): MODEL,
}


def seed_scores(sessions: sessionmaker[Session], cases: int = CASES) -> None:
    """``cases`` images, each scored by the confirm model and labelled by a reader."""
    rng = random.Random(20261203)
    truth = [n % 3 == 0 for n in range(cases)]  # prevalence 1/3
    # Overlapping classes: a live AUROC well below the card's 0.997.
    probabilities = [min(max(rng.gauss(0.72 if t else 0.42, 0.2), 0.001), 0.999) for t in truth]
    with session_scope(sessions) as session:
        made = instances(session, cases)
        scores(
            session,
            made,
            probabilities,
            model=MODEL,
            version=VERSION,
            finding_code=PNEUMONIA,
            threshold=THRESHOLD,
            manufacturer="ACME",
            ood_distances=[rng.uniform(0.3, 0.6) for _ in made],
        )
        labels = [
            Label(PNEUMONIA, present, "dr-test", "test", sop_instance_uid=case.sop_instance_uid)
            for case, present in zip(made, truth, strict=True)
        ]
        add_feedback(session, labels, actor="test")


def fixed(value: float | None, digits: int = 3) -> str:
    """``value.toFixed(digits)`` as the page writes it (ties away from zero, on the
    float's exact value), "—" for null."""
    if value is None:
        return "—"
    return str(Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def with_ci(value: float | None, ci: list[float | None]) -> str:
    return f"{fixed(value)} ({fixed(ci[0])}–{fixed(ci[1])})"


def open_models(driver: WebDriver, node: ApiNode, token: str = VIEWER_TOKEN) -> None:
    driver.get(f"{node.base_url}/dashboard/#token={token}")
    wait_for(driver, lambda d: d.find_element("id", "nav-models").is_displayed(), "nav")
    driver.find_element("id", "nav-models").click()
    section = driver.find_element("id", "models")
    wait_for(driver, lambda d: section.is_displayed(), "models view")
    wait_for(driver, lambda d: version_rows(d), "model versions")


def version_rows(driver: WebDriver) -> list[list[str]]:
    rows = driver.find_elements("css selector", "#versions-body tr")
    return [[td.text for td in row.find_elements("tag name", "td")] for row in rows]


def performance_rows(driver: WebDriver) -> list[WebElement]:
    return driver.find_elements("css selector", "#performance-body tr")


def cell(row: WebElement, column: str) -> str:
    found = row.find_element("css selector", f"td[data-column='{column}']")
    return " ".join((found.get_attribute("textContent") or "").split())


def expected_performance(node: ApiNode) -> list[dict[str, Any]]:
    with session_scope(node.sessions) as session:
        return performance(session, model_registry.cards(node.settings, session))


def assert_clean_console(driver: WebDriver) -> None:
    entries = console(driver)
    assert csp_violations(entries) == []
    assert [e["message"] for e in entries if e["level"] == "SEVERE"] == []


def test_models_view_shows_versions_live_performance_and_drift(
    node: ApiNode, browser: WebDriver
) -> None:
    seed_scores(node.sessions)
    expected = expected_performance(node)
    assert [(p["model"], p["version"], p["role"]) for p in expected] == [(MODEL, VERSION, "active")]
    live = expected[0]
    assert live["n_labelled"] == CASES and live["below_card"]  # the seed is meant to be so

    open_models(browser, node)
    assert "token" not in browser.current_url
    assert browser.current_url.endswith("#models")
    assert not browser.find_element("id", "worklist-view").is_displayed()

    # (a) the shipped versions, in force.
    shown = {(r[0], r[1]): r for r in version_rows(browser)}
    for (finding, role), name in SHIPPED.items():
        cells = shown[(finding, role)]
        assert cells[2] == name and cells[3] == VERSION
        assert cells[4] == "active" and cells[5] == "configured" and cells[6] == "—"
    badge = browser.find_element("css selector", "#versions-body tr .badge.state-active")
    assert badge.value_of_css_property("background-color") == "rgba(46, 125, 50, 1)"

    # (b) the live figures, exactly as computed from the same database.
    wait_for(browser, lambda d: performance_rows(d), "performance rows")
    (row,) = performance_rows(browser)
    assert cell(row, "model") == f"{MODEL}@{VERSION}"
    assert cell(row, "finding") == f"pneumonia ({PNEUMONIA})"
    assert cell(row, "role") == "active"
    assert cell(row, "n_labelled") == str(CASES)
    assert cell(row, "prevalence") == f"{100 * live['prevalence']:.1f} %"
    assert cell(row, "auroc") == with_ci(live["auroc"], live["auroc_ci"])
    assert cell(row, "sensitivity") == with_ci(live["sensitivity"], live["sensitivity_ci"])
    assert cell(row, "specificity") == with_ci(live["specificity"], live["specificity_ci"])
    assert cell(row, "ece") == fixed(live["ece"])
    assert cell(row, "card_auroc") == fixed(live["card"]["auroc"])
    below = row.find_element("css selector", ".badge.below-card")
    assert below.text == "below card"
    assert below.get_attribute("title") == live["warning"]
    assert below.value_of_css_property("background-color") == "rgba(198, 40, 40, 1)"
    assert not browser.find_element("id", "performance-empty").is_displayed()

    # (c) one drift plot per signal with a bundle reference, each with its level.
    with node.client(VIEWER_TOKEN) as client:
        drift = client.get("/api/models").json()["drift"]
    assert {d["signal"] for d in drift} >= {"probability", "gate_distance", "refused"}
    wait_for(browser, lambda d: len(plots(d)) == len(drift), "drift plots")
    for entry, plot in zip(drift, plots(browser), strict=True):
        caption = plot.find_element("css selector", "figcaption .drift-title").text
        assert caption == f"{MODEL}@{VERSION} · {entry['signal']}"
        level = plot.find_element("css selector", ".badge.level")
        assert level.text == entry["level"] and entry["level"] in ("ok", "warn", "alert")
        assert f"level-{entry['level']}" in (level.get_attribute("class") or "")
        assert f"PSI {fixed(entry['psi'])}" in plot.text and f"n {entry['n']}" in plot.text
        bars = plot.find_elements("css selector", "svg rect.bar")
        assert len(bars) == 2 * len(entry["plot"]["bins"])
        heights = [float(bar.get_attribute("height") or "nan") for bar in bars]
        tallest = max(entry["plot"]["reference"] + entry["plot"]["live"])
        assert max(heights) > 0 and all(h >= 0 for h in heights)
        assert tallest > 0
    assert not browser.find_element("id", "drift-empty").is_displayed()

    # Back to the worklist, and forth: the views switch without a reload.
    browser.execute_script("window.__same_page = true;")
    browser.find_element("id", "nav-worklist").click()
    wait_for(browser, lambda d: d.find_element("id", "worklist-view").is_displayed(), "worklist")
    assert not browser.find_element("id", "models").is_displayed()
    wait_for(
        browser,
        lambda d: d.find_elements("css selector", "#worklist-body tr.study"),
        "worklist rows",
    )
    browser.find_element("id", "nav-models").click()
    wait_for(browser, lambda d: d.find_element("id", "models").is_displayed(), "models again")
    assert browser.execute_script("return window.__same_page === true;")
    assert_clean_console(browser)


def test_models_view_without_scores_shows_empty_states(node: ApiNode, browser: WebDriver) -> None:
    browser.get(f"{node.base_url}/dashboard/#token={TOKEN}&view=models")
    section = browser.find_element("id", "models")
    wait_for(browser, lambda d: section.is_displayed(), "models view from the fragment")
    wait_for(browser, lambda d: version_rows(d), "model versions")
    assert "token" not in browser.current_url
    empty = browser.find_element("id", "performance-empty")
    wait_for(browser, lambda d: empty.is_displayed(), "performance empty state")
    assert empty.text == "No labelled cases yet"
    assert not browser.find_element("id", "performance").is_displayed()
    drift_empty = browser.find_element("id", "drift-empty")
    assert drift_empty.is_displayed() and drift_empty.text == "Not enough images yet for drift"
    assert plots(browser) == []
    assert_clean_console(browser)


def plots(driver: WebDriver) -> list[WebElement]:
    return driver.find_elements("css selector", "#drift-plots figure.drift")
