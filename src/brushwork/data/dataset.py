"""`open_dataset`: one entry point from a data set name or path to a torch Dataset of model tensors."""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from brushwork.data.folder import DataOptions, FolderDataset, LoadReport
from brushwork.data.holdout import read_hold_out
from brushwork.data.io import write_emoji
from brushwork.data.shapes import TRAIN_TASK_WEIGHTS, ShapesDataset
from brushwork.data.transforms import ImageTransform
from brushwork.errors import BrushworkError

NAMES = ("shapes", "emoji")
# 20,000 scenes, not more: a UNet stage encodes each item's latents once, when first drawn, and on 2 CPU cores that
# halves its speed for the first epoch; 100,000 gave a 150-minute budget's UNet one slow epoch (docs/training.md).
SHAPES_DEFAULT_N = 20_000
SHAPES_CANVAS = 64   # the shapes contract is drawn at 64 px; other resolutions are resized by the transform
ACCEPTED = ("'shapes', 'emoji', or a path: a folder of images with metadata.jsonl (file_name, text) "
            "or a .txt caption beside each image, a folder of such split folders (train/, test/), WebDataset "
            ".tar/.tar.gz shards (a file, a folder of them or a brace list shard-{00000..00009}.tar), a .parquet "
            "file or a folder of them, or a `datasets` save_to_disk folder")

__all__ = ["open_dataset", "open_source", "ImageTextDataset", "DataOptions", "LoadReport", "cache_root",
           "emoji_folder", "data_facts", "report_lines"]


def cache_root() -> Path:
    """~/.cache/brushwork, or $BRUSHWORK_CACHE when set."""
    return Path(os.environ.get("BRUSHWORK_CACHE") or "~/.cache/brushwork").expanduser()


def emoji_folder(size: int) -> Path:
    """The emoji data set at `size` px as a folder in the cache, built on first use.

    The build goes to a per-process staging folder that is renamed into place, so concurrent first
    uses (several training processes) never see a partial folder; the loser of the race drops its copy.
    """
    folder = cache_root() / f"emoji-{size}"
    if (folder / "metadata.jsonl").is_file():
        return folder
    staging = folder.parent / f".{folder.name}.build-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # left over from a crashed build by a process with our pid
    try:
        write_emoji(staging, size=size, overwrite=True)
    except OSError as error:
        raise BrushworkError(f"cannot write the emoji cache in {folder.parent} ({error}); "
                             "set BRUSHWORK_CACHE to a writable folder") from None
    try:
        staging.rename(folder)
    except OSError:
        if not (folder / "metadata.jsonl").is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def open_source(spec: str | Path, resolution: int = 64, n: int | None = None, seed: int = 0,
                options: DataOptions = DataOptions(),
                shapes_tasks: dict[str, float] | None = TRAIN_TASK_WEIGHTS) -> torch.utils.data.Dataset:
    """The raw source behind `spec`: items {"image": PIL.Image, "text": str, ...}, with a `.report`.

    For shapes, n is the number of samples (default 20,000) and shapes_tasks the share of each task (default: the
    training draw, TRAIN_TASK_WEIGHTS; None: equal); other sources are read whole (n is applied by ImageTextDataset).
    """
    if resolution < 8:
        raise BrushworkError(f"resolution must be at least 8 px, got {resolution}")
    if spec == "shapes":
        source = ShapesDataset(SHAPES_DEFAULT_N if n is None else n, seed, shapes_tasks, size=SHAPES_CANVAS)
        source.report = LoadReport(loaded=len(source))
        return source
    if spec == "emoji":
        return FolderDataset(emoji_folder(resolution))
    path = Path(spec).expanduser()
    if not path.exists() and "{" not in str(spec):   # a brace list of shards names files, not itself
        raise BrushworkError(f"unknown data set {str(spec)!r}: no such name or path. Accepted: {ACCEPTED}")
    return FolderDataset(spec, draft_side=resolution, options=options)


class ImageTextDataset(torch.utils.data.Dataset):
    """A raw source with the image transform applied: items {"pixel_values": FloatTensor[3, H, W] in
    [-1, 1], "text": str}. `limit` keeps the first `limit` items."""

    def __init__(self, source: torch.utils.data.Dataset, transform: ImageTransform, limit: int | None = None):
        if limit is not None and limit < 1:
            raise BrushworkError(f"n must be at least 1, got {limit}")
        self.source = source
        self.transform = transform
        self.length = len(source) if limit is None else min(limit, len(source))
        self.report: LoadReport = source.report

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        item = self.source[index]
        out = {"pixel_values": self.transform(item["image"]), "text": item["text"]}
        # Object regions are boxes on the original image: they stay valid through a resize, not a crop or flip.
        width, height = item["image"].size
        if item.get("regions") and width == height and not self.transform.random_flip:
            out["regions"] = item["regions"]
        return out

    def captions(self) -> list[str] | Iterator[str]:
        """Every caption (for tokenizer training) without decoding any image."""
        if isinstance(self.source, ShapesDataset):
            return (self.source.scene(i).caption for i in range(self.length))
        return self.source.captions()[: self.length]


def data_facts(data: ImageTextDataset) -> dict:
    """What training.json records of the data: its layout and split, the usable count, the problems found and the
    hold-out it was written with (`data shapes --hold-out`); for the built-in shapes, its task weights."""
    facts = data.report.to_json()
    if isinstance(data.source, ShapesDataset):
        facts["shapes_tasks"] = data.source.task_weights
    source = getattr(data.source, "source", None)   # a FolderDataset's located source
    if source is not None:
        facts["layout"] = source.layout
        if source.split is not None:
            facts["split"] = source.split
        hold_out = read_hold_out(source.path) if source.path.is_dir() else None
        if hold_out:
            facts["hold_out"] = hold_out
    return facts


def report_lines(spec: str, data: ImageTextDataset, limit: int = 20) -> list[str]:
    """What `train` prints about the user's data: `data inspect`'s counts and problems (the first `limit`)."""
    if spec in NAMES:
        return []
    source = getattr(data.source, "source", None)
    where = f" ({source.describe()})" if source is not None else ""
    lines = [f"data set: {spec}{where}", f"usable image-caption pairs: {data.report.loaded}",
             f"problems: {len(data.report.skipped)}", *data.report.problem_lines(limit)]
    if len(data.report.skipped) > limit:
        lines.append(f"  (`brushwork data inspect {spec}` lists every one)")
    return lines


def open_dataset(spec: str, resolution: int = 64, n: int | None = None, seed: int = 0,
                 center_crop: bool = True, random_flip: bool = False,
                 options: DataOptions = DataOptions(),
                 shapes_tasks: dict[str, float] | None = TRAIN_TASK_WEIGHTS) -> ImageTextDataset:
    """A name ("shapes", "emoji") or a path (see ACCEPTED) as a Dataset of {"pixel_values", "text"} at
    `resolution`. For shapes, n is the sample count (default 20,000), seed picks the samples and shapes_tasks
    weights the tasks (see open_source); for other sources n keeps the first n items; `options` picks a split and
    columns. BrushworkError if missing or empty."""
    source = open_source(spec, resolution, n, seed, options, shapes_tasks)
    transform = ImageTransform(resolution, center_crop=center_crop, random_flip=random_flip)
    return ImageTextDataset(source, transform, limit=None if spec == "shapes" else n)
