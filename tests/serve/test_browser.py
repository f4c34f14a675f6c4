"""The page in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``)
driven through Selenium opens the page, uploads an image, types a sentence, submits, waits
for the overlay and checks its pixels against the Segmenter's mask, twice: the mask image
the browser loaded (read back through a canvas) and the overlay as it is drawn on screen
(a screenshot, cell by cell). The screenshot is kept in the test's tmp folder.

Without a browser the test skips with the reason; under ``CI=true`` it fails instead (CI
installs them: ``apt-get install -y chromium chromium-driver``).

``REXFAST_SERVE_MODEL=<model folder>`` runs it on that model instead of the tiny one (its
demo scenes as example rows, the first row's image and sentence, or row
``REXFAST_SERVE_EXAMPLE``), and ``REXFAST_SERVE_SCREENSHOT=<png>`` also writes the
screenshot there: README's docs/serve.png is made this way from a ``rexfast demo`` model.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rexfast.engine.segmenter import Segmenter
from rexfast.serve.examples import demo_data_root, demo_examples
from serve_helpers import free_port, require

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1100", "--force-device-scale-factor=1")
TIMEOUT_S = 240  # a page load or an answer on a loaded 2-core machine

READ_PIXELS = """
const img = arguments[0];
const canvas = document.createElement('canvas');
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const ctx = canvas.getContext('2d');
ctx.drawImage(img, 0, 0);
return canvas.toDataURL('image/png');
"""


# where the image's pixels are drawn inside its <img> box (Gradio draws it object-fit: contain, centred)
CONTENT_BOX = """
const img = arguments[0], r = img.getBoundingClientRect();
const fit = getComputedStyle(img).objectFit;
let w = r.width, h = r.height;
if (fit === 'contain' || fit === 'scale-down') {
  const s = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight, fit === 'scale-down' ? 1 : Infinity);
  w = img.naturalWidth * s; h = img.naturalHeight * s;
}
return [r.left + (r.width - w) / 2, r.top + (r.height - h) / 2, w, h, window.devicePixelRatio];
"""


def _skip_or_fail(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI must run the browser test: apt-get install -y chromium chromium-driver)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        _skip_or_fail(f"selenium is not installed (pip install -e \".[serve]\"): {exc}")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        _skip_or_fail("no headless browser here: Debian's chromium and chromium-driver are not installed "
                      "(apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}")  # a fresh profile
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page(demo_layout):
    require("gradio")
    from rexfast.serve import build_app, launch

    model = os.environ.get("REXFAST_SERVE_MODEL")
    folder = Path(model) if model else demo_layout["folders"]["rela"]
    segmenter = Segmenter.from_pretrained(folder, device="cpu", precision="fp32")
    root = demo_data_root(folder, segmenter.config)
    examples = demo_examples(root) if root is not None else []
    if model:
        if not examples:
            pytest.fail(f"REXFAST_SERVE_MODEL={model} is not a rexfast demo model: no scenes found beside it")
        image, text = examples[int(os.environ.get("REXFAST_SERVE_EXAMPLE", "0"))]
    else:
        image, text = demo_layout["images"][0], "the red circle"
    name = type(segmenter.model).__name__
    app = build_app({name: segmenter}, examples=examples, sources=[str(folder)])
    _, url, _ = launch(app, port=free_port(), block=False, quiet=True)
    try:
        yield {"url": url, "segmenter": segmenter, "image": Path(image), "text": text}
    finally:
        app.close()


def _wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, TIMEOUT_S, poll_frequency=0.25).until(condition, message=f"waiting for {what}")


def _loaded(driver, selector):
    """The <img> elements under ``selector`` once each has finished loading, or False."""
    from selenium.webdriver.common.by import By

    images = driver.find_elements(By.CSS_SELECTOR, selector)
    if images and all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                      for img in images):
        return images
    return False


def test_the_page_in_a_browser_shows_the_segmenters_mask(browser, page, tmp_path):
    from selenium.webdriver.common.by import By

    expected = page["segmenter"](page["image"], page["text"])
    browser.get(page["url"])
    upload = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#rexfast-image input[type='file']"),
                   "the image upload")
    upload.send_keys(str(page["image"]))
    _wait(browser, lambda d: _loaded(d, "#rexfast-image img"), "the uploaded image's preview")
    box = browser.find_element(By.CSS_SELECTOR, "#rexfast-text textarea")
    box.clear()
    box.send_keys(page["text"])
    browser.find_element(By.CSS_SELECTOR, "#rexfast-submit").click()

    base, mask = _wait(browser, lambda d: _loaded(d, "#rexfast-overlay-0 img.base-image, #rexfast-overlay-0 img.mask"),
                       "the overlay")
    verdict = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#rexfast-verdict-0 textarea")
                    .get_attribute("value"), "the verdict")
    time.sleep(0.5)  # the mask's fade-in
    shot = tmp_path / "serve.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("REXFAST_SERVE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["REXFAST_SERVE_SCREENSHOT"])

    # 1. the mask image the browser loaded is the Segmenter's mask, pixel for pixel
    data = browser.execute_script(READ_PIXELS, mask)
    rgba = np.asarray(Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGBA"))
    np.testing.assert_array_equal(rgba[..., 3] > 0, expected.mask)
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(
        browser.execute_script(READ_PIXELS, base).split(",", 1)[1]))).convert("RGB"))
    np.testing.assert_array_equal(shown, np.asarray(Image.open(page["image"]).convert("RGB")))
    if expected.no_target:
        assert verdict.startswith("no target")
    else:
        assert verdict.startswith(f"{100.0 * expected.mask.mean():.1f}% of the image segmented")

    # 2. on screen: each image cell drawn magenta-tinted exactly where the mask is
    left, top, width, height, ratio = browser.execute_script(CONTENT_BOX, base)
    screen = np.asarray(Image.open(shot).convert("RGB")).astype(np.float32)
    h, w = expected.mask.shape
    ys = ((top + (np.arange(h) + 0.5) * height / h) * ratio).astype(int)
    xs = ((left + (np.arange(w) + 0.5) * width / w) * ratio).astype(int)
    drawn = screen[ys[:, None], xs[None, :]]
    original = np.asarray(Image.open(page["image"]).convert("RGB").resize((w, h))).astype(np.float32)
    towards_magenta = (drawn - original) @ np.array([1.0, -1.0, 1.0])  # red and blue up, green down
    tinted = towards_magenta > 40
    if expected.mask.any():  # cells on the mask's border may blend with their neighbours when scaled
        inside = tinted[expected.mask].mean()
        assert inside > 0.9, f"only {inside:.1%} of the mask's cells are drawn magenta-tinted"
    else:
        assert os.environ.get("REXFAST_SERVE_MODEL"), "the tiny model's answer should hold a mask to check"
    outside = (~tinted[~expected.mask]).mean()
    assert outside > 0.98, f"{1 - outside:.1%} of the cells outside the mask are drawn tinted"
    assert shot.stat().st_size > 10_000
