"""Live mode as a user sees it: Chromium (Debian's, driven by Playwright) types into the web page's prompt box
with Live on, and the page itself times each frame from the keystroke that asked for it to the decoded image
(`window.liveFrames`, set by static/app.js). Prints p50/p95, how many keystrokes got a frame, and the p50 of the
first and second half of the run (drift).

    python benchmarks/bench_live_page.py [--models shapes-gan,PATH-TO-FEW-STEP] [--steps 4] [--cps 8] [--seconds 60]
        [--compile]

The baseline, in the same process, is the pipeline call alone on the same prompts (bench_live.baseline).
Needs `playwright` (the test extra) and /usr/bin/chromium.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from playwright.sync_api import sync_playwright

from brushwork.generation.auto import BrushworkPipeline
from brushwork.generation.loading import quiet_libraries
from brushwork.serve.common import ServeConfig

from bench_live import TEXT, baseline, percentiles
from bench_serve import Server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def type_in_page(page, cps: float, seconds: float) -> dict:
    """Type TEXT's sentences one after another at `cps` keys per second; a new sentence replaces the last
    (select all, then its first key). Returns the page's frames and the keystroke count."""
    page.click("#prompt")
    page.keyboard.press("Control+A")
    start_page = page.evaluate("performance.now()")
    page.evaluate("window.liveFrames.length = 0")
    start, keys, sentence, end = time.perf_counter(), 0, 0, 0
    while time.perf_counter() - start < seconds:
        if end == len(TEXT[sentence]):
            sentence, end = (sentence + 1) % len(TEXT), 0
            page.keyboard.press("Control+A")
        page.keyboard.type(TEXT[sentence][end])
        end += 1
        keys += 1
        time.sleep(max(0.0, start + keys / cps - time.perf_counter()))
    time.sleep(2.0)   # the last frames come home
    frames = page.evaluate("window.liveFrames")
    return {"keystrokes": keys, "frames": frames, "start": start_page}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="shapes-gan")
    parser.add_argument("--steps", type=int, default=4, help="live steps for a diffusion model")
    parser.add_argument("--cps", type=float, default=8.0, help="typing speed, characters per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="compile the models first, as `serve --compile`")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_libraries()
    print(f"torch threads {args.threads}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"typing {args.cps:g} char/s for {args.seconds:g} s")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for model in args.models.split(","):
            pipe = BrushworkPipeline.from_pretrained(model, device="cpu", dtype=None if args.compile else torch.float32,
                                                     threads=args.threads, compile=args.compile)
            steps = 1 if pipe.resolve_steps(None) == 1 else args.steps
            pipe(["warm up"], num_inference_steps=steps, seed=0)
            base = baseline(pipe, steps, 30)
            with Server(pipe, ServeConfig(default_steps=steps)) as server:
                page = browser.new_page()
                page.goto(server.url)
                page.wait_for_function("document.querySelector('#model').textContent.includes('model')")
                page.check("#live")
                page.wait_for_function("window.liveFrames.length > 0", timeout=60_000)   # first frame: warm
                result = type_in_page(page, args.cps, args.seconds)
                page.close()
            frames = [f for f in result["frames"] if f["total"] is not None]
            half = result["start"] + args.seconds * 1000 / 2
            first = [f["total"] for f in frames if f["at"] < half]
            second = [f["total"] for f in frames if f["at"] >= half]
            print(f"\n{model}" + (f" {steps} steps" if steps > 1 else "") + (", compiled" if args.compile else ""))
            print(f"  baseline pipe call        {percentiles(base)}")
            print(f"  keystroke to screen       {percentiles([f['total'] for f in frames])}  "
                  f"(server {percentiles([f['ms'] for f in frames])})")
            print(f"  {len(frames)}/{result['keystrokes']} keystrokes got a frame; p50 first half "
                  f"{statistics.median(first or [float('nan')]):.1f} ms, second half "
                  f"{statistics.median(second or [float('nan')]):.1f} ms")
        browser.close()


if __name__ == "__main__":
    main()
