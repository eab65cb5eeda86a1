"""Time the full emoji build (render + name every OpenMoji emoji) and writing it as a data set folder.

    python benchmarks/bench_emoji.py [--size 64]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from brushwork.data.emoji import build_emoji, openmoji_codepoints
from brushwork.data.io import write_emoji


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    build = build_emoji(args.size)
    build_seconds = time.perf_counter() - start
    print(f"OpenMoji files: {len(openmoji_codepoints())}")
    print(f"built {len(build.items)} named emoji at {args.size}x{args.size} in {build_seconds:.1f} s")
    for reason, count in build.skipped_by_reason().most_common():
        print(f"skipped {count}: {reason}")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_emoji(Path(tmp) / "emoji", size=args.size)
        print(f"built and wrote the data set folder in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
