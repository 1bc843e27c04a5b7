"""The demo in a real headless Chromium: type a prompt, Generate, upload a Fashion-MNIST image, read the answer.

Uses Debian's /usr/bin/chromium through Playwright's sync API (never `playwright install`: no browser is
downloaded). The server runs in this process on a free localhost port with the untrained
`random_bundle`, so the answer is random but must be one of the generated classes.
A screenshot goes to tmp_path, and to $TINA_SCREENSHOT_DIR/demo.png when that is set.
"""

import os
import re
import shutil
import socket
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
TIMEOUT_MS = 30_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo on 127.0.0.1:<free port>, served from Gradio's background thread; yields its URL."""
    pytest.importorskip("gradio")
    from test_serve import fashion_test_set

    from serve.app import Demo, build_app, launch
    from tina.training.testing import random_bundle

    fashion = fashion_test_set()
    demo = Demo.from_checkpoint(random_bundle(tmp_path_factory.mktemp("browser") / "gen"),
                                dataset_loader=lambda name: fashion)
    app = build_app(demo=demo)
    _, url, _ = launch(app, host="127.0.0.1", port=free_port(), block=False)
    try:
        yield url, fashion
    finally:
        app.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def test_prompt_generate_upload_predict(server, browser, tmp_path):
    from PIL import Image

    url, fashion = server
    i = int((fashion.test_y == fashion.classes.index("sneaker")).nonzero()[0][0])  # a real sneaker
    png = tmp_path / "sneaker.png"
    Image.fromarray(fashion.test_x[i, :, :, 0]).save(png)

    t0 = time.perf_counter()
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)

    page.fill("#prompt textarea", "classify sneakers vs sandals")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Classes (output order)')")
    status = page.inner_text("#status")
    classes = re.findall(r"\d+ = ([^·\n]+?)\s*(?:·|\n|$)", status)
    assert classes == ["sneaker", "sandal"], status
    assert "parameters" in status and "generated in" in status

    page.set_input_files("#image-input input[type=file]", str(png))
    heading = page.locator("#prediction [data-testid=label-output-value]")
    heading.wait_for()
    predicted = heading.inner_text().strip()
    assert predicted in classes
    bars = page.locator("#prediction [data-testid$=-confidence-set]")
    assert sorted(bars.nth(j).get_attribute("data-testid").removesuffix("-confidence-set")
                  for j in range(bars.count())) == sorted(classes)
    page.wait_for_function("document.querySelector('#prediction-text').innerText.includes('Prediction')")

    # A test image from the dataset, then the zip of the model folder.
    page.click("#random-image")
    page.wait_for_function("document.querySelector('#image-caption').innerText.includes('true class')")
    page.click("#download")
    link = page.locator("#model-zip [data-testid=download-link][download='sneaker-vs-sandal.zip']")
    link.wait_for()
    assert page.request.get(link.get_attribute("href")).body()[:2] == b"PK"  # a zip archive
    page.wait_for_function("document.querySelector('#prediction-text').innerText.includes('Prediction')")

    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("TINA_SCREENSHOT_DIR"):
        out = Path(os.environ["TINA_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / "demo.png")

    # Bad input is answered in the page (and the server keeps going): a text file posing as a PNG, an empty prompt.
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.set_input_files("#image-input input[type=file]", str(bad))
    page.wait_for_function("document.querySelector('#prediction-text').innerText.includes('Could not classify')")
    assert "not a readable image" in page.inner_text("#prediction-text")
    page.fill("#prompt textarea", "")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Could not generate')")
    assert "type a prompt" in page.inner_text("#status") and "still loaded" in page.inner_text("#status")
    page.close()
    assert time.perf_counter() - t0 < 60
