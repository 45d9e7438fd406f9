"""The service's page in a real browser: headless Chromium (Debian's chromium + chromium-driver) through Selenium,
against the service started with uvicorn on a free localhost port over an index built here.

Each step saves a screenshot under the test's tmp folder. ``CLIP_MED_README_SCREENSHOT=1`` also writes the
README's picture, ``docs/images/web_page.png``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pydicom.data
import pytest
from api_helpers import gradient, png_bytes
from PIL import Image
from web_helpers import HOSTILE_CAPTION, HOSTILE_SOURCE, TOKEN, Server, build_archive

import clip_med
from clip_med.inference.service import ServiceLimits, WebConfig, create_app

pytestmark = pytest.mark.browser

LIMITS = ServiceLimits(max_upload_bytes=2_000_000, max_k=40)
WAIT = 60
README_SHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "web_page.png"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return build_archive(tmp_path_factory.mktemp("page"), dev=24)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1200,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(archive):
    index = clip_med.open_index(archive.folder)
    app = create_app(archive.model, index, {"modality": archive.head}, LIMITS, WebConfig(thumbnail_side=96))
    with Server(app) as url:
        yield url


def _wait(driver, condition, message):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(lambda d: condition(d), message)


def _shot(driver, shots: Path, name: str) -> Path:
    path = shots / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.is_file() and path.stat().st_size > 1000, path
    return path


THUMBS_LOADED = """
const images = Array.from(document.querySelectorAll('#results img.thumb'));
return images.length > 0 && images.every((img) => img.complete && img.naturalWidth > 0);
"""


def _cards(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#results .card")


def _search(driver, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "query")
    box.clear()
    box.send_keys(text, Keys.ENTER)


def _ready(driver, url):
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    _wait(driver, lambda d: "images in the index" in d.find_element(By.ID, "service").text, "the page did not start")


def _status(driver):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "status")


def test_search_filter_upload_detail_and_errors(browser, served, archive, shots, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    _ready(browser, served)
    _shot(browser, shots, "00-empty")
    # 1. a text search shows thumbnails that are real images, read from the shards
    _search(browser, "a CT of the head")
    _wait(browser, lambda d: len(_cards(d)) == 24 and d.execute_script(THUMBS_LOADED), "no thumbnails appeared")
    sizes = browser.execute_script("return Array.from(document.querySelectorAll('#results img.thumb'))"
                                   ".map((img) => [img.naturalWidth, img.naturalHeight]);")
    assert all(width > 0 and height > 0 for width, height in sizes)
    _shot(browser, shots, "01-search")
    # markup in captions, ids and sources is shown as text and never runs
    Select(browser.find_element(By.ID, "filter-source")).select_by_value(HOSTILE_SOURCE)
    _wait(browser, lambda d: len(_cards(d)) == 3 and d.execute_script(THUMBS_LOADED), "no hostile rows")
    for card in _cards(browser):
        caption = card.find_element(By.CSS_SELECTOR, ".caption")
        assert caption.get_attribute("title") == HOSTILE_CAPTION and caption.text.startswith("<img src=x")
        assert HOSTILE_SOURCE in card.find_element(By.CSS_SELECTOR, ".where").text
        assert "<b onmouseover" in card.find_element(By.CSS_SELECTOR, ".ident").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#results script, #results .caption img, #results b")
    assert browser.execute_script("return window.__pwned === undefined;")
    _shot(browser, shots, "01-hostile-captions-as-text")
    Select(browser.find_element(By.ID, "filter-source")).select_by_value("")
    _wait(browser, lambda d: len(_cards(d)) == 24, "clearing the source filter did not widen the grid")

    # 2. a filter narrows the grid (applied in the search: the total is the filter's row count)
    modality = Select(browser.find_element(By.ID, "filter-modality"))
    value = modality.options[1].get_attribute("value")
    count = int(modality.options[1].text.rsplit("(", 1)[1].rstrip(")"))
    modality.select_by_value(value)
    _wait(browser, lambda d: len(_cards(d)) == min(count, 24) and d.execute_script(THUMBS_LOADED),
          "the filter did not narrow the grid")
    labels = [card.find_element(By.CSS_SELECTOR, ".labels").text for card in _cards(browser)]
    assert count < 27 and all(label.startswith(value) for label in labels), labels
    assert f"modality = {value}" in browser.find_element(By.ID, "summary").text
    _shot(browser, shots, "02-filter")
    modality.select_by_value("")
    _wait(browser, lambda d: len(_cards(d)) == 24, "clearing the filter did not widen the grid")

    # 3. an uploaded PNG and an uploaded DICOM each show probability bars and neighbours
    png = tmp_path / "scan.png"
    png.write_bytes(png_bytes(gradient(64, 64, seed=3)))
    dicom = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    for number, path in enumerate((png, dicom)):
        browser.find_element(By.ID, "file").send_keys(str(path))
        _wait(browser, lambda d, name=path.name: name in d.find_element(By.ID, "classification-title").text
              and d.find_element(By.ID, "classification").is_displayed(), f"{path.name} was not classified")
        _wait(browser, lambda d: len(_cards(d)) == 24 and d.execute_script(THUMBS_LOADED), "no neighbours")
        bars = browser.find_elements(By.CSS_SELECTOR, "#classifiers .bar-fill")
        headings = [element.text for element in browser.find_elements(By.CSS_SELECTOR, "#classifiers h3")]
        assert len(headings) == 3 and headings[2].startswith("head modality"), headings
        widths = browser.execute_script("return Array.from(document.querySelectorAll('#classifiers .bar-fill'))"
                                        ".map((bar) => bar.getBoundingClientRect().width);")
        assert len(bars) >= 4 and max(widths) > 0
        shot = _shot(browser, shots, f"03-upload-{path.suffix[1:]}")
        if number == 0 and os.environ.get("CLIP_MED_README_SCREENSHOT"):
            README_SHOT.parent.mkdir(parents=True, exist_ok=True)
            Image.open(shot).convert("RGB").quantize(colors=96).save(README_SHOT, optimize=True)

    # 4. a result opens from the keyboard; "more like this" returns it first
    _search(browser, "an MRI of the spine")
    _wait(browser, lambda d: len(_cards(d)) == 24 and d.execute_script(THUMBS_LOADED), "no results")
    chosen = _cards(browser)[5]
    position = chosen.get_attribute("data-position")
    browser.execute_script("arguments[0].focus();", chosen)
    chosen.send_keys(Keys.ENTER)
    dialog = browser.find_element(By.ID, "detail")
    _wait(browser, lambda d: dialog.get_attribute("open") is not None and d.execute_script(
        "const img = document.getElementById('detail-image'); return img.complete && img.naturalWidth > 0;"),
        "the detail view did not show the image")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#detail-meta tbody tr")) >= 8, "no metadata")
    rows = {row.find_element(By.TAG_NAME, "th").text: row.find_element(By.TAG_NAME, "td").text
            for row in browser.find_elements(By.CSS_SELECTOR, "#detail-meta tbody tr")}
    assert rows["position"] == position and {"caption", "shard", "key", "labels", "split", "source"} <= set(rows)
    _shot(browser, shots, "04-detail")
    browser.find_element(By.ID, "more-like-this").click()
    _wait(browser, lambda d: len(_cards(d)) == 24 and _cards(d)[0].get_attribute("data-position") == position
          and d.execute_script(THUMBS_LOADED), "more like this did not return the item first")
    assert f"images like item {position}" in browser.find_element(By.ID, "summary").text
    _shot(browser, shots, "05-more-like-this")
    # paging
    first_page = [card.get_attribute("data-position") for card in _cards(browser)]
    browser.find_element(By.ID, "pager-next").click()
    _wait(browser, lambda d: _cards(d) and d.find_element(By.ID, "pager-info").text == "page 2", "no page 2")
    assert not set(first_page) & {card.get_attribute("data-position") for card in _cards(browser)}

    # 5. a corrupt upload shows an error message, not a blank page
    broken = tmp_path / "broken.png"
    broken.write_bytes(png_bytes(gradient())[:70])
    browser.find_element(By.ID, "file").send_keys(str(broken))
    _wait(browser, lambda d: "error" in _status(d).get_attribute("class") and "could not be used" in _status(d).text,
          "no error message for a corrupt upload")
    assert "[HTTP 4" in _status(browser).text
    _shot(browser, shots, "06-corrupt-upload")


def test_moved_shards_show_a_message_not_a_broken_image(browser, archive, shots, tmp_path):
    from selenium.webdriver.common.by import By

    from clip_med.inference.extract import ExtractConfig, extract

    shard = tmp_path / "dev-000000.tar"
    shutil.copy(archive.hostile_shard, shard)
    extract(archive.model, [str(shard)], tmp_path / "out", ExtractConfig(workers=0, progress=False))
    shard.rename(tmp_path / "moved.tar")
    with Server(create_app(archive.model, clip_med.open_index(tmp_path / "out"), None, LIMITS)) as url:
        _ready(browser, url)
        _search(browser, "a CT of the head")
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".image-status")) == 3 and all(
            "moved or deleted" in element.text for element in d.find_elements(By.CSS_SELECTOR, ".image-status")),
            "no message for the moved shard")
        _shot(browser, shots, "07-moved-shard")


def test_with_a_token_the_page_asks_for_it_and_the_api_refuses_without(browser, archive, shots):
    from selenium.webdriver.common.by import By

    index = clip_med.open_index(archive.folder)
    with Server(create_app(archive.model, index, None, LIMITS, token=TOKEN)) as url:
        browser.delete_all_cookies()
        browser.get(url + "/")
        _wait(browser, lambda d: d.find_elements(By.ID, "token"), "the page did not ask for the token")
        assert not browser.find_elements(By.ID, "results")
        assert browser.execute_script("return fetch('/health').then((r) => r.status);") == 401
        for path in ("/", "/static/app.js", "/health", "/openapi.json", "/docs", "/items/0/thumbnail"):
            assert httpx.get(url + path).status_code == 401, path
        _shot(browser, shots, "08-token-asked")
        field = browser.find_element(By.ID, "token")
        field.send_keys("wrong-token-wrong-token")
        browser.find_element(By.ID, "login").click()
        _wait(browser, lambda d: d.find_elements(By.ID, "login-error"), "a wrong token was not refused")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "login").click()
        _wait(browser, lambda d: d.find_elements(By.ID, "service") and
              "images in the index" in d.find_element(By.ID, "service").text, "the page did not open with the token")
        _search(browser, "a CT of the head")
        _wait(browser, lambda d: len(_cards(d)) == 24 and d.execute_script(THUMBS_LOADED),
              "no thumbnails with the token")
        assert httpx.get(url + "/health", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        _shot(browser, shots, "09-token-search")
        browser.delete_all_cookies()
