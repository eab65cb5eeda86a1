"""Time to generate and render shapes samples (target: 10,000 in under 10 s on 2 CPU cores).

    python benchmarks/bench_shapes.py [--n 10000]
"""

import argparse
import time

from brushwork.data.shapes import ShapesDataset, render
from brushwork.eval.checker import check


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--check", type=int, default=1_000, help="images to run the checker on (0: skip)")
    args = parser.parse_args()

    ds = ShapesDataset(n=args.n, seed=0)
    start = time.perf_counter()
    for i in range(args.n):
        ds[i]
    generation = time.perf_counter() - start
    print(f"generated and rendered {args.n} samples in {generation:.2f} s: {args.n / generation:,.0f} samples/s")

    start = time.perf_counter()
    for i in range(args.n):
        ds.scene(i)
    scenes_elapsed = time.perf_counter() - start
    print(f"  of which scene sampling alone: {scenes_elapsed:.2f} s ({args.n / scenes_elapsed:,.0f} scenes/s)")

    if args.check:
        items = [(render(ds.scene(i)), ds.scene(i).caption) for i in range(args.check)]
        start = time.perf_counter()
        passed = sum(check(image, caption).ok for image, caption in items)
        elapsed = time.perf_counter() - start
        print(f"checked {args.check} images in {elapsed:.2f} s: {args.check / elapsed:,.0f} images/s, "
              f"{passed / args.check:.2%} pass")
    if generation > 10 * args.n / 10_000:
        raise SystemExit(f"too slow: {generation:.2f} s for {args.n} samples (target: 10 s per 10,000)")


if __name__ == "__main__":
    main()
