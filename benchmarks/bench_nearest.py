"""Nearest training images for the near-copy search: brushwork's blockwise torch matmul against faiss-cpu; and,
with --index-images N, the time to build the index of N shapes images with the shipped model's CLIP.

    python benchmarks/bench_nearest.py [--n 100000] [--dim 256] [--queries 1500] [--k 8] [--index-images 100000]

The index is n random unit vectors (the shipped shapes CLIP embeds to 256-d), stored as `eval` caches it: a
float32 .npy read memory-mapped. The queries are what one `eval` searches: CALIBRATION_IMAGES training images
plus the generated ones. faiss (optional: pip install faiss-cpu) runs its exact inner-product index (IndexFlatIP)
and, for scale, an approximate HNSW index whose build is timed too. Threads: OMP_NUM_THREADS / torch's default.
The index build is what the first `brushwork eval --data shapes` of a model pays (drawing the scenes included);
later evaluations read it from the cache.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from brushwork.eval import creativity, memorisation


def timed(label: str, work) -> object:
    start = time.perf_counter()
    result = work()
    print(f"{label}: {time.perf_counter() - start:.3f} s")
    return result


def time_index_build(count: int) -> None:
    from brushwork.eval.features import ClipEmbedder
    from brushwork.generation.registry import resolve_model

    model = resolve_model("shapes")
    embedder = ClipEmbedder(model / "clip", model / "tokenizer", device="cpu")
    data = creativity.training_data("shapes", {}, 64, count)
    with tempfile.TemporaryDirectory() as cache:
        index = memorisation.build_index(data, embedder, "bench", Path(cache))
        size_mb = index.embeddings.nbytes / 2**20
    print(f"index of {count:,} shapes images (draw, render, embed, write {size_mb:.0f} MB): {index.seconds:.1f} s, "
          f"{count / index.seconds:.0f} images/s, torch threads {torch.get_num_threads()}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1500)
    parser.add_argument("--k", type=int, default=memorisation.CANDIDATES)
    parser.add_argument("--index-images", type=int, default=0,
                        help="also time building the index of this many shapes images (0: skip)")
    args = parser.parse_args()
    if args.index_images:
        time_index_build(args.index_images)
    print(f"index {args.n:,} x {args.dim}, {args.queries:,} queries, k={args.k}, torch threads "
          f"{torch.get_num_threads()}")

    generator = torch.Generator().manual_seed(0)
    vectors = memorisation.unit(torch.randn(args.n, args.dim, generator=generator)).numpy()
    queries = memorisation.unit(torch.randn(args.queries, args.dim, generator=generator))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "index.npy"
        np.save(path, vectors)
        mapped = np.load(path, mmap_mode="r")
        _, torch_rows = timed("torch blockwise matmul (exact, memory-mapped index)",
                              lambda: memorisation.nearest(queries, mapped, args.k))

    try:
        import faiss
    except ImportError:
        print("faiss-cpu is not installed: pip install faiss-cpu to compare")
        return
    flat = faiss.IndexFlatIP(args.dim)
    timed("faiss IndexFlatIP add", lambda: flat.add(vectors))
    _, faiss_rows = timed("faiss IndexFlatIP search (exact)", lambda: flat.search(queries.numpy(), args.k))
    agree = (torch.from_numpy(faiss_rows) == torch_rows).float().mean().item()
    print(f"  same neighbours as torch: {agree:.2%}")
    hnsw = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
    timed("faiss IndexHNSWFlat build (approximate)", lambda: hnsw.add(vectors))
    _, hnsw_rows = timed("faiss IndexHNSWFlat search", lambda: hnsw.search(queries.numpy(), args.k))
    recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(hnsw_rows, torch_rows.numpy())])
    print(f"  recall@{args.k} against exact: {recall:.2%}")


if __name__ == "__main__":
    main()
