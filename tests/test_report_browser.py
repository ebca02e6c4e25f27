"""The study report opened in headless Chromium: every table and plot renders.

Needs Debian's chromium and chromium-driver (CI installs them; without them the test is skipped,
unless MEDPEFT_REQUIRE_BROWSER=1). To check another report and keep its screenshot, e.g. the small
Kermany study's:

    MEDPEFT_REPORT=studies-out/kermany-small/report/report.html \
    MEDPEFT_SCREENSHOT=benchmarks/results/kermany-small-report.png \
    .venv/bin/python -m pytest tests/test_report_browser.py
"""

import os
import re
import shutil
from pathlib import Path

import pytest

from medpeft.study.report import write_report

from test_study_report import FAILED, LABELS, make_study

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("MEDPEFT_REQUIRE_BROWSER") == "1":
        raise RuntimeError("MEDPEFT_REQUIRE_BROWSER=1 but chromium / chromedriver are not installed")
    pytest.skip("headless Chromium not installed (Debian packages chromium, chromium-driver)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def render(browser, html: Path, screenshot: Path | None) -> dict:
    """What the page shows: its tables (rows, cells) and its images (rendered size)."""
    browser.get(html.resolve().as_uri())
    page = browser.execute_script("""
        return {
          tables: [...document.querySelectorAll('table')].map(t => ({
            rows: t.rows.length, cells: [...t.querySelectorAll('td')].map(c => c.innerText)})),
          images: [...document.images].map(i => ({
            complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
            shown: i.getBoundingClientRect().width, alt: i.alt})),
          text: document.body.innerText,
        };""")
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        browser.set_window_size(1400, max(1000, browser.execute_script("return document.body.scrollHeight")))
        assert browser.save_screenshot(str(screenshot))
    return page


def check_rendered(page: dict, n_figures: int, n_tables: int) -> None:
    assert len(page["tables"]) == n_tables
    for table in page["tables"]:
        assert table["rows"] >= 2 and all(cell.strip() for cell in table["cells"][:1])
    assert len(page["images"]) == n_figures
    for image in page["images"]:
        assert image["complete"] and image["width"] > 100 and image["height"] > 100 and image["shown"] > 100, image
        assert image["alt"]


def test_toy_study_report_renders_its_tables_and_plots(browser, tmp_path):
    make_study(tmp_path, LABELS, failed=FAILED, evidence=True)
    page = render(browser, write_report(tmp_path), tmp_path / "screenshot.png")
    # comparison, lora-vs-full, calibration, subgroups, external; reliability, fraction, Pareto, one heatmap
    check_rendered(page, n_figures=4, n_tables=5)
    assert "lora beats full in 2 of 2 tasks" in page["text"] and FAILED in page["text"]
    assert "ECE over 10 equal-mass bins" in page["text"] and "B (n=8)" in page["text"]
    calibration, subgroups, external = page["tables"][2:]
    assert calibration["rows"] == 5 and subgroups["rows"] == 9 and external["rows"] == 5
    assert "other.csv" in external["cells"] and "dark" in external["cells"]
    assert page["images"][0]["alt"].startswith("vit / chest_xray 100%: test reliability of bright")
    assert (tmp_path / "screenshot.png").stat().st_size > 20_000


@pytest.mark.skipif("MEDPEFT_REPORT" not in os.environ, reason="set MEDPEFT_REPORT to check a study's report")
def test_given_report_renders(browser):
    html = Path(os.environ["MEDPEFT_REPORT"])
    screenshot = Path(os.environ["MEDPEFT_SCREENSHOT"]) if "MEDPEFT_SCREENSHOT" in os.environ else None
    page = render(browser, html, screenshot)
    figures = len(list((html.parent / "figures").glob("*.png")))
    # the comparison, one per pairwise verdict, one per evidence section with data
    tables = 1 + len(re.findall(r"<h3", html.read_text())) + sum(
        (html.parent / f"{section}.csv").is_file() for section in ("calibration", "subgroups", "external"))
    check_rendered(page, n_figures=figures, n_tables=tables)
