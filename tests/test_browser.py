"""The web page in headless Debian Chromium: upload a real photo, see the predicted label.

Needs the Debian packages `chromium` and `chromium-driver` and the `selenium` package; skips
cleanly without them. Set IMGCLF_SCREENSHOT_DIR to keep the screenshot for a human to look at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from imgclf.runtime.bundle import load_bundle
from imgclf.serving.app import create_app, serve_in_thread

CHROMIUM = Path(os.environ.get("IMGCLF_CHROMIUM", "/usr/bin/chromium"))
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture()
def browser(tmp_path: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not CHROMIUM.exists() or not Path(DRIVER).exists():
        pytest.skip(
            "Debian chromium + chromium-driver are not installed (apt-get install chromium chromium-driver)"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1100,900",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        opts.add_argument(flag)
    service = webdriver.ChromeService(executable_path=DRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_uploads_real_photo_and_shows_label(browser, sign_bundle, sign_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    bundle = load_bundle(sign_bundle)
    photos = [sorted((sign_dir / c).iterdir())[0] for c in ("4", "8")]
    expected = [r["label"] for r in bundle.predict([str(p) for p in photos])]

    with serve_in_thread(create_app(bundle)) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        # The header fills in from /v1/model, proving the script ran and talked to the API.
        wait.until(EC.text_to_be_present_in_element((By.ID, "model-info"), "smallervggnet"))
        browser.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in photos))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card .pred-label")) == len(photos))
        cards = browser.find_elements(By.CSS_SELECTOR, ".card")
        # Newest first: cards are prepended in upload order.
        shown = {
            c.find_element(By.CSS_SELECTOR, ".name").text: c.find_element(By.CSS_SELECTOR, ".pred-label").text
            for c in cards
        }
        assert shown == {p.name: label for p, label in zip(photos, expected)}
        assert all(len(c.find_elements(By.CSS_SELECTOR, ".bar-row")) == 5 for c in cards)
        assert "2 classified, 0 failed" in browser.find_element(By.ID, "status").text

        # Grad-CAM toggle swaps the preview for the overlay PNG from /v1/explain.
        browser.find_element(By.ID, "cam-toggle").click()
        wait.until(
            lambda d: d.execute_script(
                "return Array.from(document.querySelectorAll('.card img'))"
                ".every(i => i.dataset.cam === '1' && i.complete && i.naturalWidth > 0)"
            )
        )
        shot_dir = Path(os.environ.get("IMGCLF_SCREENSHOT_DIR", tmp_path))
        shot_dir.mkdir(parents=True, exist_ok=True)
        shot = shot_dir / "serve_page.png"
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000

        # A non-image is refused on its card, not silently.
        bad = tmp_path / "notes.jpg"
        bad.write_text("this is not a photo")
        browser.find_element(By.ID, "file-input").send_keys(str(bad))
        wait.until(lambda d: "not an image" in d.find_element(By.CSS_SELECTOR, ".card .error").text)


def test_page_shows_label_sets_with_thresholds(browser, multilabel_bundle, colour_garment_dir):
    """Multi-label: the card names the predicted set; one bar per label, each with its threshold mark."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    bundle = load_bundle(multilabel_bundle)
    # Different file names: the cards are matched to the photos by name.
    photos = [
        sorted((colour_garment_dir / "test" / c).iterdir())[i]
        for i, c in ((0, "red_trouser"), (1, "blue_bag"))
    ]
    expected = {p.name: r["labels"] for p, r in zip(photos, bundle.predict([str(p) for p in photos]))}

    with serve_in_thread(create_app(bundle)) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(EC.text_to_be_present_in_element((By.ID, "model-info"), "labels (multi-label)"))
        browser.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in photos))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card .pred-label")) == len(photos))
        for c in browser.find_elements(By.CSS_SELECTOR, ".card"):
            name = c.find_element(By.CSS_SELECTOR, ".name").text
            want = expected[name]
            assert c.find_element(By.CSS_SELECTOR, ".pred-label").text == (", ".join(want) or "no label")
            assert len(c.find_elements(By.CSS_SELECTOR, ".bar-row")) == len(bundle.classes)
            assert len(c.find_elements(By.CSS_SELECTOR, ".bar i.threshold")) == len(bundle.classes)
            on = [
                r.find_element(By.CSS_SELECTOR, ".lbl").text
                for r in c.find_elements(By.CSS_SELECTOR, ".bar-row.top")
            ]
            assert sorted(on) == sorted(want)
