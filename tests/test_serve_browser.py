"""The page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
pick a class by name, generate, and an image of the right size appears. Installs chromium with apt-get
when missing (as root), and skips with the reason only where it can't. SERVE_SCREENSHOT=PATH keeps
a screenshot (docs/images/serve_page.png was made this way)."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from debian import Unavailable, apt_install
from serve_helpers import running_server

pytest.importorskip("fastapi")
selenium = pytest.importorskip("selenium")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1000,800"]


def chromium() -> tuple[str, str]:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        try:
            apt_install(("chromium", "chromium-driver"), "a headless browser for the page test")
        except Unavailable as e:
            pytest.skip(str(e))
    return shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_shards):
    from conftest import train_debug
    from gan.export import export

    d = tmp_path_factory.mktemp("browser")
    train_debug(d / "run", tiny_shards, "train.max_steps=5")
    export(d / "run", d / "ts")
    return d / "ts"


@pytest.mark.slow
def test_page_generates_in_real_browser(artifact, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    binary, driver_path = chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for f in FLAGS:
        opts.add_argument(f)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    opts.add_argument(f"--user-data-dir={profile}")
    with running_server("--artifact", str(artifact)) as url:
        driver = webdriver.Chrome(service=Service(driver_path), options=opts)
        try:
            driver.set_page_load_timeout(120)
            driver.get(url + "/")
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cls option")) == 10)
            assert "step 5" in driver.find_element(By.ID, "model").text
            Select(driver.find_element(By.ID, "cls")).select_by_visible_text("class3")
            n = driver.find_element(By.ID, "n")
            n.clear()
            n.send_keys("12")
            driver.find_element(By.ID, "go").click()
            wait.until(lambda d: d.find_element(By.ID, "grid").get_attribute("data-ready") == "1")
            w, h = driver.execute_script("const i = document.getElementById('grid'); return [i.naturalWidth, i.naturalHeight];")
            assert (w, h) == (8 * 34 + 2, 2 * 34 + 2)  # 12 images of 32x32, 8 per row, 2 px padding
            assert driver.find_element(By.ID, "download").get_attribute("download") == "class3-seed0.png"
            assert driver.find_element(By.ID, "error").text == ""
            shot = os.environ.get("SERVE_SCREENSHOT") or str(tmp_path / "page.png")
            assert driver.save_screenshot(shot)
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)
