"""The page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
pick a class by name, generate, and an image of the right size appears (the GAN); upload an image and
its translation (pix2pix, no generate form) or reconstruction (the VAE, beside its generate form)
appears, and a refused upload shows the server's reason. Installs chromium with apt-get
when missing (as root), and skips with the reason only where it can't. SERVE_SCREENSHOT=PATH keeps
a screenshot (docs/images/serve_page.png was made this way)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import pytest

from debian import Unavailable, apt_install
from serve_helpers import pix2pix_run, png, running_server, sketch_pairs, vae_run

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


@contextlib.contextmanager
def browser():
    """A headless Chromium driven by selenium, with its own profile; always quit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for f in FLAGS:
        opts.add_argument(f)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.set_page_load_timeout(120)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
def test_page_generates_in_real_browser(artifact, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with running_server("--artifact", str(artifact)) as url, browser() as driver:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cls option")) == 10)
        assert "step 5" in driver.find_element(By.ID, "model").text
        generate(driver, wait, "class3", 12)
        assert natural_size(driver, "grid") == (8 * 34 + 2, 2 * 34 + 2)  # 12 images of 32x32, 8 per row, 2 px padding
        assert driver.find_element(By.ID, "download").get_attribute("download") == "class3-seed0.png"
        assert driver.find_element(By.ID, "error").text == ""
        assert not driver.find_element(By.ID, "upload-form").is_displayed()  # the GAN takes no image
        shot = os.environ.get("SERVE_SCREENSHOT") or str(tmp_path / "page.png")
        assert driver.save_screenshot(shot)


@pytest.fixture(scope="module")
def image_runs(tmp_path_factory, tiny_shards):
    """A 2-step pix2pix run (sketch 1 channel -> photo 3 channels) and a 2-step conditional VAE run."""
    root = tmp_path_factory.mktemp("browser_families")
    return {"pix2pix": pix2pix_run(root / "p2p", sketch_pairs(root)), "vae": vae_run(root / "vae", tiny_shards)}


def upload(driver, wait, path, resize=False):
    """Choose ``path`` in the page's file input, tick resize if asked, submit; wait for the output or an error."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "file").send_keys(str(path))
    box = driver.find_element(By.ID, "resize")
    if box.is_selected() != resize:
        box.click()
    driver.execute_script("document.getElementById('upload-output').dataset.ready = '';"
                          "document.getElementById('error').textContent = '';")
    driver.find_element(By.ID, "upload-go").click()
    wait.until(lambda d: d.find_element(By.ID, "upload-output").get_attribute("data-ready") == "1"
               or d.find_element(By.ID, "error").text)


def generate(driver, wait, class_name: str, n: int):
    """Pick ``class_name`` and ``n`` in the generate form, submit; wait for the grid."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "cls")).select_by_visible_text(class_name)
    box = driver.find_element(By.ID, "n")
    box.clear()
    box.send_keys(str(n))
    driver.find_element(By.ID, "go").click()
    wait.until(lambda d: d.find_element(By.ID, "grid").get_attribute("data-ready") == "1")


def natural_size(driver, element_id):
    return tuple(driver.execute_script(f"const i = document.getElementById('{element_id}'); "
                                       f"return [i.naturalWidth, i.naturalHeight];"))


@pytest.mark.slow
def test_page_translates_an_upload_in_real_browser(image_runs, tmp_path):
    """pix2pix: no generate form; upload a grey sketch, its 32x32 translation appears with a download link;
    a 40x48 sketch is refused with the server's reason, and goes through with "stretch" ticked."""
    import numpy as np
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    sketch = tmp_path / "sketch.png"
    sketch.write_bytes(png(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)))
    wide = tmp_path / "wide.png"
    wide.write_bytes(png(np.zeros((48, 40), np.uint8)))
    with running_server("--run", str(image_runs["pix2pix"])) as url, browser() as driver:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_element(By.ID, "upload-go").text == "Translate")
        assert driver.find_element(By.ID, "title").text == "pix2pix: image translation"
        assert not driver.find_element(By.ID, "form").is_displayed()  # nothing to generate
        assert not driver.find_element(By.ID, "upload-cls-label").is_displayed()
        assert "grey images of 32x32 pixels" in driver.find_element(By.ID, "upload-hint").text
        upload(driver, wait, sketch)
        assert driver.find_element(By.ID, "error").text == ""
        assert natural_size(driver, "upload-output") == (32, 32)
        assert driver.find_element(By.ID, "upload-download").get_attribute("download") == "translate-sketch.png"
        upload(driver, wait, wide)
        assert "takes 32x32 images; this one is 40x48" in driver.find_element(By.ID, "error").text
        upload(driver, wait, wide, resize=True)
        assert driver.find_element(By.ID, "error").text == "" and natural_size(driver, "upload-output") == (32, 32)
        assert driver.save_screenshot(str(tmp_path / "page.png"))


@pytest.mark.slow
def test_page_reconstructs_and_generates_in_real_browser(image_runs, tmp_path):
    """The VAE: the generate form with its classes, and the upload form with a class for its conditional
    decoder; a reconstruction of an uploaded RGB image appears; a grey one is refused naming the channels."""
    import numpy as np
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    photo = tmp_path / "photo.png"
    photo.write_bytes(png(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    grey = tmp_path / "grey.png"
    grey.write_bytes(png(np.zeros((32, 32), np.uint8)))
    with running_server("--run", str(image_runs["vae"])) as url, browser() as driver:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#upload-cls option")) == 10)
        assert driver.find_element(By.ID, "form").is_displayed() and driver.find_element(By.ID, "upload-form").is_displayed()
        assert driver.find_element(By.ID, "upload-go").text == "Reconstruct"
        Select(driver.find_element(By.ID, "upload-cls")).select_by_visible_text("class4")
        upload(driver, wait, photo)
        assert driver.find_element(By.ID, "error").text == ""
        assert natural_size(driver, "upload-output") == natural_size(driver, "upload-input") == (32, 32)
        upload(driver, wait, grey)
        assert "takes 3-channel (RGB) images; this one has 1" in driver.find_element(By.ID, "error").text
        generate(driver, wait, "class2", 3)
        assert natural_size(driver, "grid") == (3 * 34 + 2, 34 + 2)
        assert driver.save_screenshot(str(tmp_path / "page.png"))
