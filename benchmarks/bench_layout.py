"""Time layout guidance against plain sampling on the same prompts, seeds and model, in one process.

    python benchmarks/bench_layout.py [--model shapes] [--batch 8] [--threads 1] [--repeats 3]

Prints milliseconds per image (the median of the repeats) for a relation prompt and a counting prompt, with
and without layout guidance, and the ratio.
"""

import argparse
import statistics
import time

import torch

from brushwork.generation.auto import BrushworkPipeline

PROMPTS = {"relation": "a red circle above a blue square", "count": "three red circles"}


def per_image_ms(pipe: BrushworkPipeline, prompt: str, batch: int, layout: bool, repeats: int) -> float:
    pipe([prompt] * batch, seed=0, layout=layout)   # one untimed call: allocations, kernel choice
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe([prompt] * batch, seed=0, layout=layout)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / batch * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = BrushworkPipeline.from_pretrained(args.model, device="cpu", threads=args.threads)
    print(f"model {args.model}, batch {args.batch}, {args.threads} thread(s), 20 steps, eager fp32")
    for kind, prompt in PROMPTS.items():
        plain = per_image_ms(pipe, prompt, args.batch, False, args.repeats)
        layout = per_image_ms(pipe, prompt, args.batch, True, args.repeats)
        print(f"{kind:9s} plain {plain:6.0f} ms/image   layout {layout:6.0f} ms/image   layout/plain {layout / plain:.2f}")


if __name__ == "__main__":
    main()
