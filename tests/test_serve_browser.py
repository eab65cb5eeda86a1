"""The web page in a real browser (Debian's Chromium driven by Playwright): type a prompt, generate, see the
images with their parameters, cancel a running job; nothing is fetched from outside the server."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from sd_tiny import build_tiny_sd
from serve_helpers import GatedPipe, live_server

from brushwork.generation.auto import BrushworkPipeline
from brushwork.serve.app import create_app
from brushwork.serve.common import ServeConfig

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no browser at {CHROMIUM}: the browser test needs "
                                "Debian's chromium (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    folder = build_tiny_sd(tmp_path_factory.mktemp("serve-browser") / "tiny")
    pipe = BrushworkPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    app = create_app(GatedPipe(pipe, delay=0.03), ServeConfig(default_steps=3, preview_every=2))
    with live_server(app) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_generate_and_cancel_in_the_page(browser, page_url):
    page = browser.new_page()
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(page_url)
    sync_api.expect(page.locator("#model")).to_contain_text("model tiny")

    page.fill("#prompt", "a red circle")
    page.fill("#steps", "4")
    page.fill("#count", "2")
    page.click("#dice")
    seed = int(page.input_value("#seed"))
    page.click("#generate")
    figures = page.locator("#gallery figure")
    sync_api.expect(figures).to_have_count(2, timeout=30_000)
    loaded = page.eval_on_selector_all("#gallery img", "images => images.map(i => i.complete && i.naturalWidth)")
    assert loaded == [32, 32]
    parameters = figures.locator(".parameters").all_inner_texts()
    assert all(text.startswith("a red circle\nSteps: 4, ") for text in parameters)
    assert sorted(int(text.split("Seed: ")[1].split(",")[0]) for text in parameters) == [seed, seed + 1]
    assert figures.first.locator("a.download").get_attribute("href").startswith("blob:")

    page.fill("#steps", "150")
    page.fill("#count", "1")
    page.click("#generate")
    job = page.locator("#jobs .job")
    sync_api.expect(job.locator(".job-state")).to_contain_text("step", timeout=30_000)
    sync_api.expect(job.locator(".preview")).to_have_attribute("src", re.compile("^data:image/png;base64,"))
    job.locator(".cancel").click()
    sync_api.expect(job.locator(".job-state")).to_contain_text("cancelled", timeout=30_000)
    assert figures.count() == 2
    assert all(url.startswith((page_url, "blob:", "data:")) for url in requested), requested
    page.close()


def test_layout_guidance_from_the_page(browser, page_url):
    page = browser.new_page()
    page.goto(page_url)
    sync_api.expect(page.locator("#layout-row")).to_be_visible()   # a diffusion model: the box is offered
    page.fill("#prompt", "a red circle above a blue square")
    page.fill("#steps", "3")
    page.fill("#count", "1")
    page.check("#layout")
    page.click("#generate")
    figure = page.locator("#gallery figure")
    sync_api.expect(figure).to_have_count(1, timeout=30_000)
    assert "Layout: on" in figure.locator(".parameters").inner_text()
    page.close()


def test_live_mode_follows_the_prompt(browser, page_url):
    if not any(importlib.util.find_spec(name) for name in ("websockets", "wsproto")):
        pytest.skip("uvicorn serves WebSockets only with websockets or wsproto installed (pip install websockets)")
    page = browser.new_page()
    page.goto(page_url)
    sync_api.expect(page.locator("#model")).to_contain_text("model tiny")
    page.fill("#seed", "5")
    page.check("#live")
    sync_api.expect(page.locator("#live-panel")).to_be_visible()
    assert page.input_value("#steps") == "3"  # a model that is not few-step renders live at the server's default steps
    page.locator("#prompt").press_sequentially("a red circle", delay=20)
    image = page.locator("#live-image")
    sync_api.expect(image).to_have_attribute("data-prompt", "a red circle", timeout=30_000)
    sync_api.expect(page.locator("#live-ms")).to_contain_text("ms from keystroke to screen")
    frames = page.evaluate("window.liveFrames")
    assert frames[-1]["prompt"] == "a red circle" and frames[-1]["ms"] > 0 and frames[-1]["total"] >= frames[-1]["ms"]
    assert len(frames) <= len("a red circle") + 1
    first = image.get_attribute("src")
    page.click("#dice")  # a new seed, the same prompt: a new frame
    sync_api.expect(image).not_to_have_attribute("src", first, timeout=30_000)
    page.uncheck("#live")
    sync_api.expect(page.locator("#live-panel")).to_be_hidden()
    page.close()
