"""Memorisation: does a model copy its training images?

Every training image is embedded once by the evaluation CLIP's image tower (unit length) into an index that is
cached on disk per data set and CLIP (`cache_root()/index/`), written a batch at a time and read back
memory-mapped, so a data set larger than memory is streamed. Each generated image's nearest training images are
found by exact cosine search, plain torch matmuls over blocks of the index (scripts/bench_nearest.py measures it
against faiss-cpu), and the CANDIDATES nearest are compared with it in pixel space.

A generated image is a near-copy of its pixel-nearest training image when it sits far closer to that image than
to the rest of its neighbourhood: the pixel distance to the nearest candidate is at most COPY_RATIO times the mean
pixel distance to all CANDIDATES (a relative distance, as in the extraction attacks of Carlini et al. 2023). An
absolute threshold taken from the training set's own nearest-neighbour distances fails on real data, measured on
emoji: skin-tone variants sit 0.02 apart, exact duplicates 0, while a model's copy of a training image never
comes closer than its decoder reproduces it (0.04-0.14), so the visible copies scored 0%. The calibration is the
same rule applied to CALIBRATION_IMAGES training images against the others (their exact duplicates, pixel RMS
below DUPLICATE_PIXEL, left out): the rate at which the data already looks copied from itself, reported beside
the models' rates with the share of training images that have an exact duplicate.
"""

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.progress import track

from brushwork.data.dataset import ImageTextDataset, cache_root
from brushwork.data.shapes import ShapesDataset
from brushwork.data.transforms import to_image
from brushwork.eval import metrics
from brushwork.models.clip_embedder import ClipEmbedder, resize_images

COPY_RATIO = 0.5            # a copy: nearest pixel distance <= this times the mean over the candidates
CANDIDATES = 16             # embedding neighbours each image is compared with in pixel space
DUPLICATE_PIXEL = 0.01      # pixel RMS below which two training images are the same picture
CALIBRATION_IMAGES = 1000   # training images checked against the others by the same rule
PIXEL_SIDE = 64             # images are compared in pixels at this side (PIL bicubic), RMS over [0, 1] RGB
EMBED_BATCH = 256           # training images embedded (and held in memory) at a time
SEARCH_BLOCK = 16_384       # index rows per matmul of the search
SEARCH = "exact cosine search: torch matmul over blocks of 16,384 index rows"


@dataclass
class TrainingIndex:
    """A data set's images as unit CLIP image embeddings [N, D] (memory-mapped from the cache)."""

    data: ImageTextDataset
    embeddings: np.ndarray
    path: Path
    seconds: float          # spent embedding the data set; 0 when the index came from the cache

    def __len__(self) -> int:
        return len(self.embeddings)

    def image(self, index: int) -> Image.Image:
        return to_image(self.data[index]["pixel_values"])

    def caption(self, index: int) -> str:
        return self.data[index]["text"]


def _data_fingerprint(data: ImageTextDataset) -> dict:
    """What identifies a data set's items: a shapes draw's settings, or a folder's item names and captions and
    its files' sizes and times (a changed folder gets a new index)."""
    source = data.source
    if isinstance(source, ShapesDataset):
        hold_out = source.hold_out.texts if source.hold_out else None
        return {"shapes": [len(data), source.seed, source.task_weights, source.size, hold_out]}
    items = hashlib.sha256()
    for record in source.records[:len(data)]:
        items.update(f"{record.name}\t{record.text}\n".encode())
    files = [source.source.path, *source.source.files]
    return {"path": str(Path(source.source.path).resolve()), "items": items.hexdigest(),
            "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]}


def index_key(data: ImageTextDataset, clip_hash: str, resolution: int) -> str:
    facts = {"data": _data_fingerprint(data), "clip": clip_hash, "resolution": resolution, "version": 1}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]


def unit(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.float(), dim=1)


def build_index(data: ImageTextDataset, embedder: ClipEmbedder, key: str, cache: Path | None = None) -> TrainingIndex:
    """The data set's index: read from the cache, or embedded a batch at a time into a file renamed into place."""
    folder = Path(cache or cache_root() / "index")
    path = folder / f"{key}.npy"
    if path.is_file():
        return TrainingIndex(data, np.load(path, mmap_mode="r"), path, 0.0)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{key}.partial-{os.getpid()}.npy"
    start = time.perf_counter()
    try:
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(len(data), embedder.dim))
        for first in track(range(0, len(data), EMBED_BATCH), description=f"indexing {len(data)} training images"):
            images = [to_image(data[i]["pixel_values"]) for i in range(first, min(first + EMBED_BATCH, len(data)))]
            out[first:first + len(images)] = unit(embedder.image_embeds(images)).numpy()
        out.flush()
        del out
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return TrainingIndex(data, np.load(path, mmap_mode="r"), path, time.perf_counter() - start)


def nearest(queries: torch.Tensor, embeddings: np.ndarray, k: int,
            exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest index rows of each unit query by cosine distance (1 - cosine similarity), ascending:
    distances [Q, k] and row numbers [Q, k]. exclude[q] is a row query q may not match (itself)."""
    k = min(k, len(embeddings) - (exclude is not None))
    best = torch.full((len(queries), 0), -float("inf"))
    rows = torch.zeros((len(queries), 0), dtype=torch.long)
    for first in range(0, len(embeddings), SEARCH_BLOCK):
        block = torch.tensor(embeddings[first:first + SEARCH_BLOCK])   # a copy: the memory map is read-only
        similarity = queries @ block.T
        if exclude is not None:
            local = exclude - first
            inside = (local >= 0) & (local < len(block))
            similarity[inside.nonzero().squeeze(1), local[inside]] = -float("inf")
        top = similarity.topk(min(k, len(block)), dim=1)
        merged = torch.cat([best, top.values], dim=1).topk(k, dim=1)
        best = merged.values
        rows = torch.cat([rows, top.indices + first], dim=1).gather(1, merged.indices)
    return 1 - best, rows


def pixel_distances(image: Image.Image, others: list[Image.Image]) -> torch.Tensor:
    """RMS difference over [0, 1] RGB between `image` and each of `others`, all resized to PIXEL_SIDE."""
    pixels = resize_images([image, *others], PIXEL_SIDE).float() / 255
    return (pixels[1:] - pixels[:1]).pow(2).mean(dim=(1, 2, 3)).sqrt()


@dataclass
class Neighbours:
    """Each image's nearest training image: its embedding distance, and the pixel-closest of the candidates."""
    embedding: list[float]     # cosine distance to the nearest training image
    pixel: list[float]         # RMS pixel distance to the closest of the CANDIDATES nearest
    relative: list[float]      # that distance over the mean pixel distance to the candidates
    match: list[int]           # that training image's row
    match_embedding: list[float]
    duplicate: list[bool]      # (training images against the others) an exact duplicate was left out


def _neighbours(index: TrainingIndex, images: list[Image.Image], queries: torch.Tensor,
                exclude: torch.Tensor | None = None) -> Neighbours:
    """With exclude (training images against the others), candidates that are an exact duplicate are left out."""
    distances, rows = nearest(queries, index.embeddings, CANDIDATES, exclude)
    found = Neighbours([], [], [], [], [], [])
    for image, row_distances, candidates in zip(images, distances, rows):
        pixel = pixel_distances(image, [index.image(int(row)) for row in candidates])
        kept = pixel > DUPLICATE_PIXEL if exclude is not None else torch.ones_like(pixel, dtype=torch.bool)
        if not kept.any():   # every candidate a duplicate: compare with them all
            kept[:] = True
        pixel = torch.where(kept, pixel, torch.inf)
        best = int(pixel.argmin())
        found.embedding.append(float(row_distances[kept].min()))
        found.pixel.append(float(pixel[best]))
        found.relative.append(float(pixel[best] / pixel[kept].mean().clamp_min(1e-8)))
        found.match.append(int(candidates[best]))
        found.match_embedding.append(float(row_distances[best]))
        found.duplicate.append(not bool(kept.all()))
    return found


def _rate(copies: list[bool]) -> dict:
    low, high = metrics.wilson_interval(sum(copies), len(copies))
    return {"copy_rate": sum(copies) / len(copies), "low": low, "high": high, "copies": sum(copies), "n": len(copies)}


@dataclass
class Calibration:
    """The data's own reference: its images checked against the others by the copy rule."""
    train: Neighbours
    duplicate_share: float     # training images with an exact duplicate among their candidates

    def to_json(self) -> dict:
        return {"copy_ratio": COPY_RATIO, "duplicate_pixel": DUPLICATE_PIXEL, "n": len(self.train.embedding),
                "duplicate_share": self.duplicate_share,
                "train_copies": _rate([r <= COPY_RATIO for r in self.train.relative]),
                "train_nearest_embedding": self.train.embedding, "train_nearest_pixel": self.train.pixel,
                "train_relative": self.train.relative}


def calibrate(index: TrainingIndex, seed: int = 0) -> Calibration:
    """The copy rule applied to CALIBRATION_IMAGES training images against the rest of the training set."""
    chosen = sorted(random.Random(seed).sample(range(len(index)), min(CALIBRATION_IMAGES, len(index))))
    images = [index.image(i) for i in track(chosen, description="checking training images against each other")]
    queries = torch.from_numpy(np.ascontiguousarray(index.embeddings[chosen]))
    train = _neighbours(index, images, queries, exclude=torch.tensor(chosen))
    return Calibration(train, sum(train.duplicate) / len(chosen))


def find_copies(images: list[Image.Image], index: TrainingIndex, embedder: ClipEmbedder) -> dict:
    """Copy rate (with its 95% Wilson interval) and each image's nearest training image."""
    found = _neighbours(index, images, unit(embedder.image_embeds(images)))
    copies = [r <= COPY_RATIO for r in found.relative]
    return {**_rate(copies), "nearest_embedding": found.embedding, "nearest_pixel": found.pixel,
            "relative": found.relative, "match": found.match, "match_embedding": found.match_embedding,
            "is_copy": copies}


def copy_summary(found: dict) -> dict:
    """find_copies' result without the per-image rows only the closest-pairs grid needs."""
    return {k: v for k, v in found.items() if k not in ("match", "match_embedding", "is_copy")}


def closest_pairs(found: dict, images: list[Image.Image], prompts: list[str], index: TrainingIndex,
                  count: int = 9) -> tuple[list[Image.Image], list[str], list[dict]]:
    """The `count` generated images nearest to a training image, each followed by that image, with captions."""
    order = sorted(range(len(images)), key=lambda i: found["relative"][i])[:count]
    cells, captions, pairs = [], [], []
    for i in order:
        row = found["match"][i]
        verdict = " COPY" if found["is_copy"][i] else ""
        cells += [images[i], index.image(row)]
        distances = f"px={found['nearest_pixel'][i]:.3f} rel={found['relative'][i]:.2f}"
        captions += [f"generated: {prompts[i]}", f"training #{row}: {distances}{verdict}"]
        pairs.append({"image": i, "prompt": prompts[i], "train_row": row, "train_caption": index.caption(row),
                      "embedding_distance": found["match_embedding"][i], "pixel_distance": found["nearest_pixel"][i],
                      "relative_distance": found["relative"][i],
                      "copy": found["is_copy"][i]})
    return cells, captions, pairs
