"""The web page at `/` in a real headless Chromium (Debian's, driven by selenium): type a prompt and
see images; attach an image, ask, see the answer; a width x height typed in the size field reaches the server,
and a size the decoder cannot make comes back as the server's message; an error in the middle of a streamed
reply is shown and the question kept; upload an image or pick one the page made, type an instruction and see
the edited image, edit that again, and see the server's message for an edit it refuses. The debug model
serves it."""

import base64
import io
import shutil
import tempfile

import pytest
import torch
from PIL import Image

from blip3o import Blip3o
from blip3o.server import BackgroundServer, Blip3oService, ServerConfig, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: make install adds it")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Chromium is not installed (apt-get install -y chromium chromium-driver; .ci/run does this)",
)

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Blip3o.from_preset("debug")


@pytest.fixture(scope="module")
def server(model):
    with BackgroundServer(create_app(Blip3oService(model, "debug", ServerConfig()))) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="blip3o-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_type_a_prompt_and_see_images(server, browser):
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "model: debug")
    browser.find_element(By.ID, "prompt").send_keys("a red circle left of a blue square")
    count = browser.find_element(By.ID, "num-images")
    count.clear()
    count.send_keys("2")
    browser.find_element(By.ID, "generate").click()
    images = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#images img.generated") or None)
    assert len(images) == 2
    assert wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#images img')].every(i => i.complete && i.naturalWidth === 32)"))
    assert "2 image(s)" in browser.find_element(By.ID, "generate-status").text


def test_attach_an_image_ask_and_see_the_answer(server, browser, tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 40, 40)).save(path)
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    browser.find_element(By.ID, "image-file").send_keys(str(path))
    wait.until(lambda d: d.find_element(By.ID, "attachment").is_displayed())
    for turn, question in enumerate(["what is in the picture?", "and what color is it?"], start=1):
        browser.find_element(By.ID, "question").send_keys(question)
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d, n=turn: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant.done")) == n)
    answers = browser.find_elements(By.CSS_SELECTOR, ".message.assistant.done")
    assert all(a.text.strip() for a in answers)
    users = browser.find_elements(By.CSS_SELECTOR, ".message.user")
    assert [u.text for u in users] == ["what is in the picture?", "and what color is it?"]
    assert users[0].find_elements(By.TAG_NAME, "img") and not users[1].find_elements(By.TAG_NAME, "img")
    assert browser.find_element(By.ID, "chat-status").get_attribute("class") != "error"
    assert not browser.find_element(By.ID, "attachment").is_displayed()  # it went with the first question
    browser.save_screenshot(str(tmp_path / "page.png"))


def generate_at(browser, size: str) -> None:
    """Type a prompt and `size` into the page and press Generate."""
    for field, text in (("prompt", "a red circle"), ("size", size)):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(text)
    count = browser.find_element(By.ID, "num-images")
    count.clear()
    count.send_keys("1")
    browser.find_element(By.ID, "generate").click()


def test_a_width_x_height_typed_on_the_page_makes_that_image(server, browser):
    page = browser
    page.get(server.url + "/")
    wait = WebDriverWait(page, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "model: debug")
    generate_at(page, "32x48")  # portrait, as OpenAI's 1024x1536, at the debug decoder's scale
    assert wait.until(lambda d: d.execute_script(
        "const im = document.querySelector('#images img.generated');"
        "return im && im.complete && im.naturalWidth === 32 && im.naturalHeight === 48"))
    generate_at(page, "30x48")
    wait.until(lambda d: "error" in d.find_element(By.ID, "generate-status").get_attribute("class"))
    assert "size 30x48: width 30 is not a positive multiple of 4" in page.find_element(By.ID, "generate-status").text


def test_an_error_in_the_middle_of_a_reply_is_shown_and_the_question_kept(browser, monkeypatch):
    """The server's error event after the first words: the page shows its message, drops the partial answer,
    marks the question as not answered and puts it back in the box (with its image) to send again."""
    model = Blip3o.from_preset("debug")

    def chat(conversations, *, on_text=None, **kwargs):
        on_text("the first words ")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "chat", chat)
    with BackgroundServer(create_app(Blip3oService(model, "debug", ServerConfig()))) as failing, \
            tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/red.png"
        Image.new("RGB", (32, 32), (220, 40, 40)).save(path)
        browser.get(failing.url + "/")
        wait = WebDriverWait(browser, 60)
        browser.find_element(By.ID, "image-file").send_keys(path)
        wait.until(lambda d: d.find_element(By.ID, "attachment").is_displayed())
        browser.find_element(By.ID, "question").send_keys("what is in the picture?")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "chat-status").get_attribute("class") == "error")
        assert "out of memory" in browser.find_element(By.ID, "chat-status").text
        assert "Cannot read" not in browser.find_element(By.ID, "chat-status").text
        assert not browser.find_elements(By.CSS_SELECTOR, ".message.assistant")
        (asked,) = browser.find_elements(By.CSS_SELECTOR, ".message.user")
        assert "failed" in asked.get_attribute("class") and "out of memory" in asked.get_attribute("title")
        assert browser.find_element(By.ID, "question").get_attribute("value") == "what is in the picture?"
        assert browser.find_element(By.ID, "attachment").is_displayed()
        assert browser.find_element(By.ID, "send").is_enabled()


def png_of(data_url: str) -> Image.Image:
    """The PNG a data: URL on the page holds, decoded."""
    header, _, payload = data_url.partition(",")
    assert header == "data:image/png;base64", header
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    image.load()
    assert image.format == "PNG"
    return image


def open_page(browser, url: str) -> WebDriverWait:
    browser.get(url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "model: debug")
    return wait


def fill(browser, **fields: str) -> None:
    """Type each field's text into the element with that id (underscores in the name are dashes)."""
    for name, text in fields.items():
        element = browser.find_element(By.ID, name.replace("_", "-"))
        element.clear()
        element.send_keys(text)


def edit_and_wait(browser, wait: WebDriverWait, instruction: str) -> Image.Image:
    """Type `instruction`, press Edit and return the edited image the page then shows (the first, decoded)."""
    shown = browser.find_elements(By.CSS_SELECTOR, "#edits img.edited")
    fill(browser, instruction=instruction)
    browser.find_element(By.ID, "edit").click()
    image = wait.until(lambda d: (d.find_elements(By.CSS_SELECTOR, "#edits img.edited") or [None])[0]
                       if not shown or _gone(shown[0]) else None)
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))
    assert "error" not in browser.find_element(By.ID, "edit-status").get_attribute("class")
    return png_of(image.get_attribute("src"))


def _gone(element) -> bool:
    try:
        element.tag_name  # noqa: B018  (a stale element raises)
        return False
    except StaleElementReferenceException:
        return True


def test_upload_an_image_type_an_instruction_and_see_it_edited(server, browser, tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 40, 40)).save(path)
    wait = open_page(browser, server.url)
    browser.find_element(By.ID, "edit-file").send_keys(str(path))
    source = wait.until(lambda d: (d.find_elements(By.CSS_SELECTOR, "#edit-sources img") or [None])[0])
    assert source.get_attribute("alt") == "red.png"
    assert not browser.find_element(By.ID, "edit-hint").is_displayed()
    fill(browser, edit_num_images="1", edit_size="32x48")  # portrait, at the debug decoder's scale
    edited = edit_and_wait(browser, wait, "make the circle blue")
    assert edited.size == (32, 48)
    (shown,) = browser.find_elements(By.CSS_SELECTOR, "#edits img.edited")
    assert shown.get_attribute("naturalWidth") == "32" and shown.get_attribute("naturalHeight") == "48"
    assert "1 image(s)" in browser.find_element(By.ID, "edit-status").text


def recorded_sources(model, monkeypatch) -> list:
    """The source images of each edit `model` makes from now on, as a list per edited image row."""
    sources = []
    edit = model.edit

    def recording_edit(images, instructions, **kwargs):
        sources.extend(list(s) if isinstance(s, list | tuple) else [s] for s in images)
        return edit(images, instructions, **kwargs)

    monkeypatch.setattr(model, "edit", recording_edit)
    return sources


def test_upload_two_images_and_edit_them_together(server, model, browser, tmp_path, monkeypatch):
    """Several files chosen at once make one edit from all of them, in the order chosen."""
    sources = recorded_sources(model, monkeypatch)
    colors = {"red.png": (220, 40, 40), "blue.png": (40, 40, 220)}
    paths = []
    for name, color in colors.items():
        Image.new("RGB", (32, 32), color).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    wait = open_page(browser, server.url)
    browser.find_element(By.ID, "edit-file").send_keys("\n".join(paths))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#edit-sources img")) == 2)
    fill(browser, edit_num_images="1", edit_size="auto")
    assert edit_and_wait(browser, wait, "put the red circle beside the blue square").size == (32, 32)
    (received,) = sources
    assert [image.convert("RGB").getpixel((0, 0)) for image in received] == list(colors.values())


def test_pick_a_generated_image_edit_it_and_edit_the_result(server, model, browser, monkeypatch):
    """The Edit button under a generated image makes it the source; the Edit button under the edited image
    makes that the next source: the model receives exactly the pixels the page shows."""
    sources = recorded_sources(model, monkeypatch)
    wait = open_page(browser, server.url)
    fill(browser, prompt="a red circle", num_images="1", size="32x32")
    browser.find_element(By.ID, "generate").click()
    generated = wait.until(lambda d: (d.find_elements(By.CSS_SELECTOR, "#images img.generated") or [None])[0])
    browser.find_element(By.CSS_SELECTOR, "#images figure button.edit-this").click()
    (source,) = browser.find_elements(By.CSS_SELECTOR, "#edit-sources img")
    assert source.get_attribute("src") == generated.get_attribute("src")
    assert browser.switch_to.active_element == browser.find_element(By.ID, "instruction")
    fill(browser, edit_num_images="1", edit_size="auto")
    first = edit_and_wait(browser, wait, "make the circle blue")
    assert first.size == (32, 32)
    browser.find_element(By.CSS_SELECTOR, "#edits figure button.edit-this").click()
    second = edit_and_wait(browser, wait, "move the circle to the left")
    assert second.size == (32, 32)
    assert [len(s) for s in sources] == [1, 1]
    expected = [png_of(generated.get_attribute("src")), first]
    for (got,), want in zip(sources, expected, strict=True):
        assert got.convert("RGB").tobytes() == want.convert("RGB").tobytes()


def test_an_edit_the_server_refuses_shows_its_message(server, browser, tmp_path):
    """No image chosen: the page says so itself. A blank instruction and a file that is not an image: the
    server's own message; nothing is shown as edited, and the image and instruction stay to try again."""
    wait = open_page(browser, server.url)
    fill(browser, instruction="make the circle blue")
    browser.find_element(By.ID, "edit").click()
    assert "choose an image to edit" in browser.find_element(By.ID, "edit-status").text

    def refused(expected: str) -> None:
        browser.find_element(By.ID, "edit").click()
        wait.until(lambda d: expected in d.find_element(By.ID, "edit-status").text)
        assert browser.find_element(By.ID, "edit-status").get_attribute("class") == "error"
        assert browser.find_element(By.ID, "edit").is_enabled()
        assert not browser.find_elements(By.CSS_SELECTOR, "#edits img")

    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 40, 40)).save(image)
    browser.find_element(By.ID, "edit-file").send_keys(str(image))
    fill(browser, instruction="   ")  # passes the browser's check for a required field; the server refuses it
    refused("prompt is empty")
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    fill(browser, edit_file=str(text))  # cleared first: the field takes several files
    fill(browser, instruction="make the circle blue")
    refused("is not an image")
    assert browser.find_element(By.ID, "instruction").get_attribute("value") == "make the circle blue"
    assert [img.get_attribute("alt") for img in browser.find_elements(By.CSS_SELECTOR, "#edit-sources img")] == [
        "notes.txt"]
    browser.save_screenshot(str(tmp_path / "page.png"))
