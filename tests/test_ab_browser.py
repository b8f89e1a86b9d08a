"""The A/B page in a real browser: headless Chromium against a real uvicorn server.

Needs Debian's chromium + chromium-driver and Selenium (scripts/install-browser.sh); skipped without them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from app.demo import write_demo_loras
from tests.conftest import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")
TEST_RUN_S = 60

selenium = pytest.importorskip("selenium", reason="run scripts/install-browser.sh (Selenium is not installed)")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("run scripts/install-browser.sh (chromium/chromium-driver are not installed)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server with the demo LoRAs; yields its base URL once /ready says so."""
    work = tmp_path_factory.mktemp("browser")
    write_demo_loras(work / "loras")
    running = ServerProcess(work, {})
    try:
        yield running.url
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def set_field(driver, element_id: str, value: str) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def pick_brand(axis, brand: str) -> None:
    control = axis.find_element(By.CSS_SELECTOR, ".brand")
    if control.tag_name == "select":  # brands listed by GET /lora/list
        Select(control).select_by_value(brand)
    else:  # free-text fallback
        control.clear()
        control.send_keys(brand)


def test_run_a_grid_and_record_a_choice(server, browser):
    wait = WebDriverWait(browser, TEST_RUN_S)
    browser.get(f"{server}/ui")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#axes .axis")) == 2)
    wait.until(lambda d: d.find_element(By.ID, "ab-form").get_attribute("data-defaults") == "loaded")
    # The form starts from sizes the embedded model serves quickly (GET /ui/defaults), not 512 x 20 steps.
    starting = {name: browser.find_element(By.ID, name).get_attribute("value") for name in ("width", "height", "steps")}
    assert starting == {"width": "64", "height": "64", "steps": "10"}
    assert browser.find_element(By.ID, "width").get_attribute("max") == "1024"
    axes = browser.find_elements(By.CSS_SELECTOR, "#axes .axis")
    for axis, (brand, weights) in zip(axes, [("acme", "0.2, 0.8"), ("globex", "0, 0.5")], strict=True):
        pick_brand(axis, brand)
        weights_input = axis.find_element(By.CSS_SELECTOR, ".weights")
        weights_input.clear()
        weights_input.send_keys(weights)
    set_field(browser, "prompt", "a red coffee cup")
    set_field(browser, "width", "64")
    set_field(browser, "height", "64")
    set_field(browser, "steps", "2")
    set_field(browser, "seed", "5")
    set_field(browser, "chosen-by", "browser-test")

    browser.find_element(By.ID, "run").click()
    # The running state shows while the test runs (the button is disabled until it is done).
    wait.until(lambda d: "Running" in d.find_element(By.ID, "status").text or d.find_elements(By.CSS_SELECTOR,
                                                                                               ".variant"))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .variant")) == 4)
    status = browser.find_element(By.ID, "status")
    assert "error" not in status.get_attribute("class"), status.text
    assert browser.find_element(By.ID, "run").is_enabled()
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .variant")
    labels = [card.find_element(By.CSS_SELECTOR, ".label").text for card in cards]
    assert labels == ["acme 0.2, globex 0", "acme 0.2, globex 0.5", "acme 0.8, globex 0", "acme 0.8, globex 0.5"]
    assert all(card.find_element(By.TAG_NAME, "img").get_attribute("naturalWidth") == "64" for card in cards)
    tops = [card.location["y"] for card in cards]
    assert tops[0] == tops[1] and tops[2] == tops[3] and tops[2] > tops[0]  # a 2x2 grid on the page
    test_id = browser.find_element(By.ID, "results").get_attribute("data-test-id")

    cards[2].click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "confirmation"), "Recorded"))
    assert "acme 0.8, globex 0" in browser.find_element(By.ID, "confirmation").text
    assert "chosen" in cards[2].get_attribute("class")

    stored = httpx.get(f"{server}/ab-test/{test_id}").json()
    assert [(c["variant"], c["chosen_by"]) for c in stored["choices"]] == [(2, "browser-test")]
    results = httpx.get(f"{server}/lora/acme/ab-results").json()
    assert results["recommended_weight"] == 0.8 and results["data"][0]["test_id"] == test_id


def test_api_docs_render_in_the_browser_without_a_network(server, browser):
    wait = WebDriverWait(browser, TEST_RUN_S)
    browser.get(f"{server}/docs")
    # Swagger UI lists the operations only if its script ran; the machine has no route to a CDN.
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {e.text.replace("\u200b", "") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert "/generate" in paths and "/lora/list" in paths
