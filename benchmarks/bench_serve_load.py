"""Load on `brushwork serve`: 200 requests from 16 concurrent clients, alternating the native (submit, then
follow the server-sent events), OpenAI and AUTOMATIC1111 APIs. Every answer must be 200/202 or 429 (queue
full, with Retry-After); none may be 5xx. Prints the answer counts and latency p50/p99.

    python benchmarks/bench_serve_load.py [--requests 200] [--clients 16] [--steps 4] [--max-queue 32]
"""

import argparse
import collections
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from bench_serve import Server, load_pipeline, percentile

from brushwork.serve.common import ServeConfig


def request(http: httpx.Client, url: str, i: int, steps: int) -> tuple[int, float]:
    """One generation through one of the three APIs; (status, seconds until the images were there)."""
    start = time.perf_counter()
    prompt = f"a red circle above a blue square, variant {i}"
    api = i % 3
    if api == 0:
        response = http.post(f"{url}/v1/generate", json={"prompt": prompt, "steps": steps, "seed": i})
        if response.status_code == 202:
            with http.stream("GET", f"{url}/v1/jobs/{response.json()['id']}/events") as events:
                for line in events.iter_lines():
                    if line.startswith("event: done"):
                        break
            status = http.get(f"{url}/v1/jobs/{response.json()['id']}/images/0.png").status_code
            return status, time.perf_counter() - start
    elif api == 1:
        response = http.post(f"{url}/v1/images/generations",
                             json={"prompt": prompt, "steps": steps, "seed": i, "response_format": "b64_json"})
    else:
        response = http.post(f"{url}/sdapi/v1/txt2img", json={"prompt": prompt, "steps": steps, "seed": i})
    if response.status_code == 429 and "retry-after" not in response.headers:
        return 0, time.perf_counter() - start  # counted as a broken answer
    return response.status_code, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes", help="model folder or shipped name")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    config = ServeConfig(max_queue=args.max_queue)
    with Server(pipe, config) as server:
        with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=2 * args.clients)) as http:
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                answers = list(pool.map(lambda i: request(http, server.url, i, args.steps), range(args.requests)))
            wall = time.perf_counter() - start
            metrics = http.get(f"{server.url}/metrics").text
    counts = collections.Counter(status for status, _ in answers)
    done = [seconds for status, seconds in answers if status == 200]
    refused = [seconds for status, seconds in answers if status == 429]
    print(f"model {pipe.name}, {args.requests} requests, {args.clients} clients, {args.steps} steps, "
          f"max queue {args.max_queue}: {wall:.1f} s")
    print("answers:", dict(sorted(counts.items())))
    if done:
        print(f"200: {len(done)}  latency p50 {statistics.median(done):.2f} s  p99 {percentile(done, 99):.2f} s")
    if refused:
        print(f"429: {len(refused)}  latency p50 {statistics.median(refused) * 1000:.0f} ms  "
              f"p99 {percentile(refused, 99) * 1000:.0f} ms")
    batches = [line for line in metrics.splitlines() if line.startswith("brushwork_batch_images_")]
    print("\n".join(line for line in batches if "_sum" in line or "_count" in line))
    bad = {status: n for status, n in counts.items() if status not in (200, 429)}
    if bad:
        raise SystemExit(f"FAILED: answers other than 200/429: {bad}")
    print("OK: every answer 200 or 429")


if __name__ == "__main__":
    main()
