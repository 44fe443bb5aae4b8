"""The leaderboard page in a real browser: Debian's headless Chromium driven by Selenium through
Debian's chromium-driver (no browser download). The table sorts on click, the plot loads, and
nothing from entry data runs as script, with or without the page's Content-Security-Policy.

Needs `apt-get install -y chromium chromium-driver`; skipped with that reason when they are absent.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from invbench.leaderboard import render
from test_leaderboard import (HOSTILE_FIGURES, HOSTILE_TOKEN, XSS_DEFENCE, XSS_NAME, hostile_transcript, make_entry,
                              write_entry)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000")

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason="Chromium is not installed: apt-get install -y chromium chromium-driver")

# Runs before the page's own scripts (and outside its CSP): records alerts and CSP violations.
WATCH = """
window.__alerts = [];
window.__violations = [];
window.alert = function (message) { window.__alerts.push(String(message)); };
document.addEventListener("securitypolicyviolation", function (e) { window.__violations.push(e.violatedDirective); });
"""


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    board = tmp_path_factory.mktemp("board")
    for entry in [make_entry("Alpha", em={"guided": 0.25, "continuous": 0.25, "projection": 0.5, "scan": 0.25}, top1=0.9),
                  make_entry("beta", em=0.25, top1=0.95, auroc=None),
                  make_entry("Gamma", em=0.75, top1=1.0),
                  make_entry(XSS_NAME, entry_id="xss", top1=0.8, defense="xss-plugin",
                             params={"note": "<svg onload=alert(2)>", "defence": XSS_DEFENCE},
                             authors="<img src=x onerror=alert(3)>", transcript=hostile_transcript(), **HOSTILE_FIGURES),
                  make_entry("Under the floor", em=0.0, top1=0.2)]:
        write_entry(board, entry)
    return render(board / "quick").html


def column_values(driver, table_id: str, title: str) -> list[str]:
    headers = [th.text.strip() for th in driver.find_elements(By.CSS_SELECTOR, f"#{table_id} thead th")]
    index = headers.index(title)
    return [row.find_elements(By.TAG_NAME, "td")[index].get_attribute("data-sort")
            for row in driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")]


def click_header(driver, table_id: str, title: str) -> None:
    headers = driver.find_elements(By.CSS_SELECTOR, f"#{table_id} thead th")
    next(th for th in headers if th.text.strip() == title).click()


def assert_nothing_ran(driver) -> None:
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert  # noqa: B018  (raises when no native alert is open)
    assert driver.execute_script("return typeof window.pwned") == "undefined"
    assert driver.execute_script("return window.__alerts") == []


def test_the_table_sorts_on_click(browser, page):
    browser.get(page.as_uri())
    def ranked() -> list[str]:
        return [r.get_attribute("data-entry-id") for r in browser.find_elements(By.CSS_SELECTOR, "#ranked tbody tr")]

    assert ranked() == ["beta", "alpha", "xss", "gamma"]  # the ranking: worst-case token accuracy 0.25, 0.5, 0.67, 0.75
    click_header(browser, "ranked", "Worst-case EM [95% CI]")
    values = [float(v) for v in column_values(browser, "ranked", "Worst-case EM [95% CI]")]
    assert values == sorted(values)
    click_header(browser, "ranked", "Worst-case EM [95% CI]")
    assert [float(v) for v in column_values(browser, "ranked", "Worst-case EM [95% CI]")] == sorted(values, reverse=True)
    click_header(browser, "ranked", "Entry")
    names = column_values(browser, "ranked", "Entry")
    assert names == sorted(names)
    click_header(browser, "ranked", "Top-1 agr. [95% CI]")
    assert ranked() == ["xss", "alpha", "beta", "gamma"]
    assert not browser.find_element(By.XPATH, "//th[text()='AUROC scan']").is_displayed()  # a detail: hidden at first
    browser.find_element(By.ID, "every-column").click()
    for _ in range(2):  # missing values (beta has no AUROC) stay last in both directions
        click_header(browser, "ranked", "AUROC scan")
        assert column_values(browser, "ranked", "AUROC scan")[-1] == ""
    assert browser.execute_script("return window.__violations") == []  # the page's own script and style are allowed


def test_the_plot_loads(browser, page):
    browser.get(page.as_uri())
    assert browser.execute_script("const img = document.getElementById('plot'); "
                                  "return img.complete && img.naturalWidth > 0")
    assert browser.execute_script("return document.getElementById('plot').naturalHeight") > 100


def test_no_script_runs_from_entry_data(browser, page):
    browser.get(page.as_uri())
    assert_nothing_ran(browser)
    texts = [td.get_attribute("textContent") for td in browser.find_elements(By.CSS_SELECTOR, "#ranked tbody td")]
    assert XSS_NAME in texts  # shown as text
    assert any(XSS_DEFENCE in t for t in texts)
    assert browser.execute_script("return document.querySelectorAll('tbody img, tbody script, tbody svg').length") == 0
    assert browser.execute_script("return window.__violations") == []  # nothing was even attempted


@pytest.mark.parametrize("which", ["index.html", "entries/xss.html"])
def test_escaping_alone_stops_entry_scripts(browser, page, tmp_path, which):
    """The board and the hostile entry's page without their Content-Security-Policy: escaping must
    hold on its own."""
    bare = tmp_path / "no-csp.html"
    bare.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", (page.parent / which).read_text()))
    browser.get(bare.as_uri())
    assert "Content-Security-Policy" not in browser.page_source
    assert_nothing_ran(browser)
    assert browser.execute_script("return document.querySelectorAll('td img, td script, td svg, td b').length") == 0


def test_an_entry_page_shows_hostile_text_as_text(browser, page):
    """The entry page of the hostile entry, reached by its link on the board: its name, submitter and
    token text (markup, quotes, an ampersand, control characters) show as text, the wrong token is
    marked, and nothing runs."""
    browser.get(page.as_uri())
    link = browser.find_element(By.CSS_SELECTOR, '#ranked tr[data-entry-id="xss"] a')
    assert link.get_attribute("href").endswith("/entries/xss.html")
    link.click()
    assert browser.find_element(By.ID, "name").text == XSS_NAME
    assert_nothing_ran(browser)
    assert "<img src=x onerror=alert(3)>" in browser.find_element(By.ID, "meta").text
    truth = browser.find_element(By.CSS_SELECTOR, "#prompt-0 tr.truth td.tokens")
    tokens = [span.get_attribute("textContent") for span in truth.find_elements(By.CSS_SELECTOR, "span.tok")]
    assert tokens == [HOSTILE_TOKEN, ' "q" & \'a\'', "\\x00\\n\\u202e"]  # a token's leading space is kept
    scan = browser.find_element(By.CSS_SELECTOR, '#prompt-0 tr.recovered[data-attack="scan"]')
    assert [m.text for m in scan.find_elements(By.CSS_SELECTOR, "mark.tok")] == ["<b>bold</b>"]
    assert browser.execute_script("return document.querySelectorAll('td img, td script, td svg, td b').length") == 0
    assert browser.execute_script("return window.__violations") == []
