"""Latency of live mode (/v1/live): frames over a real WebSocket against the plain pipeline call, and a typing
simulation that shows how many stale messages the server drops.

For each model (and each step count of a diffusion model), in one process:
  baseline  the pipeline call alone, one new prompt per call (so the text encoder runs, as when typing), in a
            thread like the server's generation thread;
  live      one message at a time over the WebSocket, waiting for each frame: client round trip and the
            server's own `ms`;
  typing    a prompt typed at --cps characters per second (each keystroke sends the prompt so far, as the web
            page does) for --seconds: keystroke-to-frame p50/p95, the p50 of the first and second half (drift),
            frames and dropped messages (a later keystroke replaced them before they started).

    python benchmarks/bench_live.py [--models shapes-gan,shapes] [--steps 2,4,8] [--cps 8,30] [--seconds 10]
    python benchmarks/bench_live.py --clients 4 --models shapes-gan,FEW-STEP --steps 4   # stream batching

Needs the `websockets` package (uvicorn serves WebSockets with it).
"""

import argparse
import json
import os
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from websockets.sync.client import connect

from brushwork.generation.loading import quiet_libraries
from brushwork.generation.auto import BrushworkPipeline
from brushwork.serve.common import ServeConfig

from bench_serve import Server

TEXT = ["a red circle above a blue square", "two green triangles", "a yellow square left of a purple circle",
        "three blue circles", "a small orange triangle below a big green square"]


def percentiles(values: list[float]) -> str:
    if not values:
        return "no frames"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered):7.1f} ms  p95 {p95:7.1f} ms"


def prompts(count: int) -> list[str]:
    """`count` different prompts: prefixes of TEXT, numbered once TEXT's run out."""
    out = []
    while len(out) < count:
        for sentence in TEXT:
            for end in range(4, len(sentence) + 1, 3):
                out.append(sentence[:end] + (f" {len(out)}" if len(out) >= 100 else ""))
    return out[:count]


def baseline(pipe, steps: int, frames: int) -> list[float]:
    """Timed in a thread of its own, as the server's generation thread runs: on a loaded machine torch's
    threads run much slower from the main thread (measured 2.6x on a 512x512 matmul at load 5 on 2 cores)."""
    times = []

    def run() -> None:
        for prompt in prompts(frames):
            start = time.perf_counter()
            pipe([prompt], num_inference_steps=steps, guidance_scale=5.0, seed=1)
            times.append((time.perf_counter() - start) * 1000)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return times


def sequential(url: str, steps: int, frames: int) -> tuple[list[float], list[float]]:
    trips, server = [], []
    with connect(url) as ws:
        for prompt in prompts(frames):
            start = time.perf_counter()
            ws.send(json.dumps({"prompt": prompt, "seed": 2, "steps": steps}))
            frame = json.loads(ws.recv())
            trips.append((time.perf_counter() - start) * 1000)
            server.append(frame["ms"])
    return trips, server


def typing(url: str, steps: int, cps: float, seconds: float) -> dict:
    """Type TEXT over and over at `cps` keystrokes per second; every keystroke sends the prompt so far."""
    sent_at: dict[str, float] = {}
    latencies: list[tuple[float, float]] = []  # (when the keystroke was sent, keystroke to frame in ms)
    keystrokes = 0
    with connect(url) as ws:
        def receive() -> None:
            for text in ws:
                frame = json.loads(text)
                if "image" in frame:
                    sent = sent_at[frame["prompt"]]
                    latencies.append((sent, (time.perf_counter() - sent) * 1000))

        reader = threading.Thread(target=receive, daemon=True)
        reader.start()
        start = time.perf_counter()
        sentence, end = 0, 0
        while (now := time.perf_counter()) - start < seconds:
            end += 1
            if end > len(TEXT[sentence]):
                sentence, end = (sentence + 1) % len(TEXT), 1
            prompt = TEXT[sentence][:end]
            sent_at[prompt] = now
            ws.send(json.dumps({"prompt": prompt, "seed": 3, "steps": steps}))
            keystrokes += 1
            time.sleep(max(0.0, start + keystrokes / cps - time.perf_counter()))
        time.sleep(1.0 + 2 * max((ms for _, ms in latencies), default=0) / 1000)  # the last frame comes home
    half = start + seconds / 2
    return {"keystrokes": keystrokes, "frames": len(latencies), "all": [ms for _, ms in latencies],
            "first": [ms for t, ms in latencies if t < half], "second": [ms for t, ms in latencies if t >= half]}


def many_typing(url: str, clients: int, steps: int, cps: float, seconds: float) -> tuple[float, list[float]]:
    """`clients` connections typing at once: frames per second over all of them, and every frame's latency."""
    results = [None] * clients

    def client(index: int) -> None:
        results[index] = typing(url, steps, cps, seconds)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(r["frames"] for r in results) / seconds, [ms for r in results for ms in r["all"]]


def stream_batching(pipe, model: str, clients: int, steps: int, seconds: float, watermark: bool) -> None:
    """The same clients against a server that renders one frame per call, then one that batches a round's."""
    print(f"\n{model}: {clients} clients typing at 30 char/s for {seconds:g} s")
    rates = {}
    for max_batch in (1, clients):
        with Server(pipe, ServeConfig(watermark=watermark, default_steps=steps, max_batch=max_batch)) as server:
            url = server.url.replace("http", "ws") + "/v1/live"
            rates[max_batch], latencies = many_typing(url, clients, steps, 30.0, seconds)
        label = "one frame per call" if max_batch == 1 else f"stream batch of up to {max_batch}"
        print(f"  {label:28} {rates[max_batch]:6.1f} frames/s  {percentiles(latencies)}")
    print(f"  stream batching: {rates[clients] / rates[1]:.2f}x the frames")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="shapes-gan,shapes")
    parser.add_argument("--steps", default="2,4,8", help="step counts for diffusion models")
    parser.add_argument("--cps", default="8,30", help="typing speeds, characters per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="typing time per speed")
    parser.add_argument("--frames", type=int, default=30, help="frames for the baseline and one-at-a-time runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--watermark", action="store_true", help="watermark live frames, as serve does by default")
    parser.add_argument("--clients", type=int, default=0, help="also: this many clients at once, with and without "
                        "stream batching (frames of one round in one pipeline call)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_libraries()
    print(f"torch threads {args.threads}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for model in args.models.split(","):
        pipe = BrushworkPipeline.from_pretrained(model, device="cpu", dtype=torch.float32, threads=args.threads)
        step_counts = [1] if pipe.resolve_steps(None) == 1 else [int(s) for s in args.steps.split(",")]
        pipe(["warm up"], num_inference_steps=step_counts[0], seed=0)
        # live mode refuses fewer steps than the server's default to a model that is not few-step
        config = ServeConfig(watermark=args.watermark, default_steps=min(step_counts))
        if args.clients:
            stream_batching(pipe, model, args.clients, step_counts[-1], args.seconds, args.watermark)
            continue
        with Server(pipe, config) as server:
            url = server.url.replace("http", "ws") + "/v1/live"
            for steps in step_counts:
                name = f"{model}" + (f" {steps} steps" if len(step_counts) > 1 or steps > 1 else "")
                print(f"\n{name}")
                print(f"  baseline pipe call       {percentiles(baseline(pipe, steps, args.frames))}")
                trips, server_ms = sequential(url, steps, args.frames)
                print(f"  live, one at a time      {percentiles(trips)}  (server ms {percentiles(server_ms)})")
                for cps in (float(c) for c in args.cps.split(",")):
                    result = typing(url, steps, cps, args.seconds)
                    dropped = result["keystrokes"] - result["frames"]
                    print(f"  typing {cps:4.0f} char/s        {percentiles(result['all'])}  "
                          f"{result['frames']}/{result['keystrokes']} keystrokes got a frame, {dropped} dropped; "
                          f"p50 first half {statistics.median(result['first'] or [0]):.1f} ms, "
                          f"second half {statistics.median(result['second'] or [0]):.1f} ms")


if __name__ == "__main__":
    main()
