"""The try-it page in a real browser: Debian's headless Chromium driven by Selenium
(through /usr/bin/chromedriver, so nothing is downloaded) against a real ``mematte serve``."""

from __future__ import annotations

import base64
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import serve_helpers
from test_serve import mask, photo, png_bytes

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_the_page_mattes_an_uploaded_photo_and_mask(checkpoint, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    height, width = 120, 160
    (tmp_path / "photo.png").write_bytes(png_bytes(photo(height, width)))
    (tmp_path / "mask.png").write_bytes(png_bytes(mask(height, width)))
    with serve_helpers.running(checkpoint) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "FastMEMatte" in d.find_element(By.ID, "model").text)  # /healthz reached
        browser.find_element(By.ID, "photo").send_keys(str(tmp_path / "photo.png"))
        browser.find_element(By.ID, "guide-file").send_keys(str(tmp_path / "mask.png"))
        wait.until(lambda d: d.find_element(By.ID, "run").is_enabled())
        browser.find_element(By.ID, "run").click()
        wait.until(
            lambda d: (
                d.find_element(By.ID, "cutout").get_attribute("data-done") == "1"
                or "error" in d.find_element(By.ID, "status").get_attribute("class")
            )
        )
        status = browser.find_element(By.ID, "status").text
        assert status.startswith("done"), status
        cutout = browser.find_element(By.ID, "cutout")
        assert (cutout.get_property("naturalWidth"), cutout.get_property("naturalHeight")) == (width, height)
        # the alpha canvas shows the cutout's alpha: opaque where the mask was, clear outside
        data_url = browser.execute_script("return document.getElementById('alpha').toDataURL('image/png')")
        alpha = np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("L"))
        assert alpha.shape == (height, width)
        assert alpha[height // 2, width // 2] > 200 and alpha[2, 2] < 50
        assert browser.find_element(By.ID, "download-cutout").is_displayed()
        shots = os.environ.get("MEMATTE_SCREENSHOT_DIR")
        if shots:
            browser.save_screenshot(os.path.join(shots, "serve_page.png"))
