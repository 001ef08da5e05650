"""The web page's size field in a real headless Chromium: a width x height typed there reaches the server, and a
size the decoder cannot make comes back as the server's message. The debug model serves it."""

import shutil
import tempfile

import pytest
import torch

from blip3o import Blip3o
from blip3o.server import BackgroundServer, Blip3oService, ServerConfig, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: make install adds it")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Chromium is not installed (apt-get install -y chromium chromium-driver; .ci/run does this)",
)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900"]


@pytest.fixture(scope="module")
def page():
    torch.manual_seed(0)
    service = Blip3oService(Blip3o.from_preset("debug"), "debug", ServerConfig())
    profile = tempfile.mkdtemp(prefix="blip3o-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    with BackgroundServer(create_app(service)) as server:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
        driver.set_page_load_timeout(60)
        try:
            driver.get(server.url + "/")
            yield driver
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)


def generate_at(browser, size: str) -> None:
    """Type a prompt and `size` into the page and press Generate."""
    for field, text in (("prompt", "a red circle"), ("size", size)):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(text)
    count = browser.find_element(By.ID, "num-images")
    count.clear()
    count.send_keys("1")
    browser.find_element(By.ID, "generate").click()


def test_a_width_x_height_typed_on_the_page_makes_that_image(page):
    wait = WebDriverWait(page, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "model: debug")
    generate_at(page, "32x48")  # portrait, as OpenAI's 1024x1536, at the debug decoder's scale
    assert wait.until(lambda d: d.execute_script(
        "const im = document.querySelector('#images img.generated');"
        "return im && im.complete && im.naturalWidth === 32 && im.naturalHeight === 48"))
    generate_at(page, "30x48")
    wait.until(lambda d: "error" in d.find_element(By.ID, "generate-status").get_attribute("class"))
    assert "size 30x48: width 30 is not a positive multiple of 4" in page.find_element(By.ID, "generate-status").text
