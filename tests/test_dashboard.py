"""The dashboard in a real headless browser (Debian's chromium, driven by its chromedriver).

A node with studies of every priority, received out of priority order, serves the page;
the browser opens it with the token in the URL fragment and must show the worklist in
priority then arrival order, node health, a study's findings and heatmap on request, and
a study that arrives later without reloading the page. A screenshot is checked to be a
real rendering (not blank) with the STAT colour on the first row's badge.

The node serves a Content-Security-Policy without inline code (``default-src 'self'``):
the browser's console log (chromedriver's ``goog:loggingPrefs``) must show no violation
and no error while the page works, and an inline script the test injects must be
refused — proof that the policy is in force, not merely sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.api_support import (
    CHEST,
    EXPECTED_ORDER,
    PRIORITY_OF,
    TOKEN,
    VIEWER_TOKEN,
    ApiNode,
    arrive,
    running_api,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")
WAIT_S = 60  # generous: the CI machine may be busy
STAT_RGB = (0xC6, 0x28, 0x28)  # --stat in dashboard.css


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)} (apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, "--window-size=1280,1100", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def node(tmp_path: Path, database_url: str, data_dir: Path) -> Iterator[ApiNode]:
    with running_api(tmp_path, database_url, data_dir / "dicom") as running:
        yield running


def study_rows(driver: WebDriver) -> list[WebElement]:
    return driver.find_elements("css selector", "#worklist-body tr.study")


def shown_accessions(driver: WebDriver) -> list[str]:
    return [row.find_elements("tag name", "td")[1].text for row in study_rows(driver)]


def wait_for(driver: WebDriver, condition: object, message: str) -> None:
    WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(condition, message)  # type: ignore[arg-type]


def console(driver: WebDriver) -> list[dict[str, Any]]:
    """Browser console entries since the last call (chromedriver empties its buffer)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")
    return entries


def csp_violations(entries: list[dict[str, Any]]) -> list[str]:
    return [e["message"] for e in entries if "Content Security Policy" in e["message"]]


def assert_csp_enforced(driver: WebDriver) -> None:
    """An inline script added to the page must not run, and the browser must say why."""
    driver.execute_script(
        "const s = document.createElement('script');"
        "s.textContent = 'window.__inline_ran = true;';"
        "document.head.append(s);"
    )
    assert driver.execute_script("return window.__inline_ran === true;") is False
    wait_for(driver, lambda d: bool(csp_violations(console(d))), "a CSP violation report")


def test_dashboard_shows_the_worklist_by_priority_health_and_heatmaps(
    node: ApiNode, browser: WebDriver, tmp_path: Path, data_dir: Path
) -> None:
    browser.get(f"{node.base_url}/dashboard/#token={TOKEN}")
    wait_for(browser, lambda d: len(study_rows(d)) == len(EXPECTED_ORDER), "worklist rows")

    assert shown_accessions(browser) == list(EXPECTED_ORDER)
    badges = [row.find_element("css selector", ".badge").text for row in study_rows(browser)]
    assert badges == [PRIORITY_OF[accession] or "—" for accession in EXPECTED_ORDER]
    assert "token" not in browser.current_url  # taken out of the address bar
    health = browser.find_element("id", "health-list")
    wait_for(browser, lambda d: "healthy" in health.text, "node health")
    assert "reachable" in health.text

    study_rows(browser)[0].find_element("tag name", "button").click()
    wait_for(browser, _heatmap_loaded, "heatmap image")
    detail = browser.find_element("css selector", "#worklist-body tr.detail:not([hidden])")
    assert "Pneumonia: 95.0 %" in detail.text

    screenshot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(screenshot))
    _check_screenshot(browser, screenshot)

    # A study that arrives later appears in its place without a page reload.
    browser.execute_script("window.__same_page = true;")
    source = data_dir / "dicom" / CHEST
    arrive(node.settings, node.sessions, node.spool, source, tmp_path, "ACC-S3", 0.99)
    wait_for(browser, lambda d: "ACC-S3" in shown_accessions(d), "refreshed worklist")
    assert shown_accessions(browser)[:4] == ["ACC-S1", "ACC-S2", "ACC-S3", "ACC-U1"]
    assert browser.execute_script("return window.__same_page === true;")

    entries = console(browser)
    assert csp_violations(entries) == []
    assert [e["message"] for e in entries if e["level"] == "SEVERE"] == []
    assert_csp_enforced(browser)


def test_dashboard_without_a_token_asks_for_one_and_shows_no_data(
    node: ApiNode, browser: WebDriver
) -> None:
    browser.get(f"{node.base_url}/dashboard/")
    login = browser.find_element("id", "login")
    wait_for(browser, lambda d: login.is_displayed(), "token form")
    assert study_rows(browser) == []
    browser.find_element("id", "token-input").send_keys("wrong-token-0123456789")
    browser.find_element("css selector", "#login-form button").click()
    wait_for(browser, lambda d: login.is_displayed(), "token form again after a 401")
    assert study_rows(browser) == []
    browser.find_element("id", "token-input").clear()
    browser.find_element("id", "token-input").send_keys(VIEWER_TOKEN)  # reads need no more
    browser.find_element("css selector", "#login-form button").click()
    wait_for(browser, lambda d: len(study_rows(d)) == len(EXPECTED_ORDER), "worklist rows")
    assert not login.is_displayed()
    study_rows(browser)[0].find_element("tag name", "button").click()
    wait_for(browser, _heatmap_loaded, "heatmap image")
    entries = console(browser)
    assert csp_violations(entries) == []
    errors = [e["message"] for e in entries if e["level"] == "SEVERE"]
    assert all("401" in message for message in errors), errors  # the wrong token only


def _heatmap_loaded(driver: WebDriver) -> bool:
    images = driver.find_elements("css selector", "img.heatmap")
    return bool(images) and bool(
        driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth;", images[0]
        )
    )


def _check_screenshot(driver: WebDriver, path: Path) -> None:
    """A decodable, non-blank PNG whose first badge is drawn in the STAT colour."""
    image = Image.open(path)
    image.load()
    assert image.format == "PNG" and image.width >= 800 and image.height >= 600
    rgb = image.convert("RGB")
    colours = rgb.getcolors(1 << 24) or []
    assert len(colours) > 50, "the screenshot is (almost) a single colour"
    badge = study_rows(driver)[0].find_element("css selector", ".badge")
    scale = float(driver.execute_script("return window.devicePixelRatio;"))
    box = badge.rect
    region = rgb.crop(
        (
            int(box["x"] * scale),
            int(box["y"] * scale),
            int((box["x"] + box["width"]) * scale),
            int((box["y"] + box["height"]) * scale),
        )
    )
    counts = sorted(region.getcolors(1 << 24) or [], reverse=True)
    assert counts, "badge outside the screenshot"
    dominant = counts[0][1]
    assert all(abs(a - b) <= 8 for a, b in zip(dominant, STAT_RGB, strict=True)), dominant
