"""Throughput of `brushwork serve` with 8 concurrent clients: dynamic batching against one job at a time.

Each client sends POST /v1/images/generations (one image, same size/steps/guidance) and waits for the
answer before sending the next. The server runs once with --max-batch 1 (one job per UNet batch) and once
with batching, and with --compile a third time, batching with the compiled pipeline (`serve --compile`:
compiled for every batch size it uses before the clock starts); images per second and per-request latency
are printed. The model is the shipped `shapes` unless --model is given.

    python benchmarks/bench_serve.py [--model shapes] [--clients 8] [--requests 4] [--steps 10] [--threads 2] [--compile]
"""

import argparse
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import torch

from brushwork.generation.loading import quiet_libraries
from brushwork.commands.serve import make_server
from brushwork.generation.auto import BrushworkPipeline
from brushwork.serve.app import create_app
from brushwork.serve.common import ServeConfig
from brushwork.serve.jobs import compiled_batch_sizes, warm_up


def load_pipeline(model: str, compile: bool = False) -> BrushworkPipeline:
    quiet_libraries()
    # compiled: the dtype serve --compile takes (bf16 on CPUs with native bf16)
    return BrushworkPipeline.from_pretrained(model, device="cpu", dtype=None if compile else torch.float32,
                                             compile=compile)


class Server:
    """`brushwork serve`'s uvicorn server for a pipeline, on a free 127.0.0.1 port, in a thread."""

    def __init__(self, pipe: BrushworkPipeline, config: ServeConfig):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = make_server(create_app(pipe, config), "127.0.0.1", port, config.shutdown_grace,
                                  log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_clients(url: str, clients: int, requests: int, steps: int) -> tuple[float, list[float]]:
    body = {"prompt": "a red circle above a blue square", "n": 1, "steps": steps, "response_format": "b64_json"}

    def client(index: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=600) as http:
            for k in range(requests):
                start = time.perf_counter()
                response = http.post(f"{url}/v1/images/generations", json={**body, "seed": index * 1000 + k})
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for per_client in pool.map(client, range(clients)) for t in per_client]
    return time.perf_counter() - start, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes", help="model folder or shipped name")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also serve the compiled pipeline")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    print(f"model {pipe.name} ({pipe.default_size}px), {args.clients} clients x {args.requests} requests, "
          f"{args.steps} steps, {args.threads} threads")
    runs = [("max batch 1", pipe, 1), (f"max batch {args.max_batch}", pipe, args.max_batch)]
    if args.compile:
        compiled = load_pipeline(args.model, compile=True)
        warm_up(compiled, compiled_batch_sizes(args.max_batch), ServeConfig().default_guidance)
        runs.append((f"max batch {args.max_batch}, compiled", compiled, args.max_batch))
    results = {}
    for label, served, max_batch in runs:
        config = ServeConfig(max_batch=max_batch, max_queue=4 * args.clients)
        with Server(served, config) as server:
            run_clients(server.url, 1, 1, args.steps)  # warm-up
            wall, latencies = run_clients(server.url, args.clients, args.requests, args.steps)
        images = args.clients * args.requests
        results[label] = images / wall
        print(f"{label}: {images / wall:6.2f} images/s  latency p50 {statistics.median(latencies):.2f} s"
              f"  p99 {percentile(latencies, 99):.2f} s  ({images} images in {wall:.1f} s)")
    print(f"batching gain: {results[runs[1][0]] / results[runs[0][0]]:.2f}x")
    if args.compile:
        print(f"compiled batching: {results[runs[2][0]] / results[runs[1][0]]:.2f}x eager batching, "
              f"{results[runs[2][0]] / results[runs[0][0]]:.2f}x one job at a time")


if __name__ == "__main__":
    main()
