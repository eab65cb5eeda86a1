"""Data set folders: writing them safely, inspecting them, and drawing preview grids.

A written folder is Hugging Face imagefolder layout, which `open_dataset` and most tools read:
`images/NNNNNN.png` and `metadata.jsonl` rows {"file_name", "text", ...extra fields}; or, with
format="webdataset", shards `shard-NNNNN.tar` of `KEY.png`, `KEY.txt` and `KEY.json` (the extra fields).
"""

import json
import math
import os
import random
import shutil
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps
from tokenizers.pre_tokenizers import Whitespace

from brushwork.data import emoji
from brushwork.data.folder import (
    DataOptions, LoadReport, Record, Source, error_reason, index_source, locate, progress_bar,
)
from brushwork.data.holdout import HOLD_OUT_FILE, HoldOut, write_hold_out
from brushwork.data.shapes import ShapesDataset
from brushwork.errors import BrushworkError


FORMATS = ("imagefolder", "webdataset")
SHARD_SIZE = 10_000   # items per written shard


def _is_data_folder(out: Path) -> bool:
    return (out / "metadata.jsonl").is_file() or any(out.glob("shard-*.tar"))


def _check_writable(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BrushworkError(f"{out} exists and is a file; give a folder path for the data set")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise BrushworkError(f"{out} is not empty; choose another folder or pass --overwrite to replace it")
        if not _is_data_folder(out):  # --overwrite must never wipe an unrelated folder
            raise BrushworkError(f"refusing to replace {out}: it is not a data set folder (no metadata.jsonl or shards)")


def write_dataset(items: Iterable[dict], out: str | Path, total: int | None = None, overwrite: bool = False,
                  extra_files: dict[str, str] | None = None, description: str = "writing",
                  format: str = "imagefolder") -> int:
    """Write items {"image": PIL.Image, "text": str, **json-able extras} as an imagefolder data set, or as
    WebDataset shards (format="webdataset").

    Everything is written into a hidden temporary folder beside `out` and renamed into place at the end,
    so an interrupted write never leaves a half data set. A non-empty `out` is refused unless `overwrite`.
    `extra_files` maps file names to text (e.g. ATTRIBUTION). Returns the number of items written.
    """
    out = Path(out).expanduser()
    if format not in FORMATS:
        raise BrushworkError(f"unknown data set format {format!r}: choose {' or '.join(FORMATS)}")
    _check_writable(out, overwrite)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        return _write_staged(items, out, staging, total, overwrite, extra_files or {}, description, format)
    except OSError as error:
        raise BrushworkError(f"cannot write the data set to {out}: {error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_staged(items: Iterable[dict], out: Path, staging: Path, total: int | None, overwrite: bool,
                  extra_files: dict[str, str], description: str, format: str) -> int:
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    width = max(6, len(str(total - 1))) if total else 6
    with progress_bar() as progress:
        task = progress.add_task(description, total=total)
        write = _write_shards if format == "webdataset" else _write_imagefolder
        count = write(items, staging, width, lambda: progress.advance(task))
    for name, text in extra_files.items():
        (staging / name).write_text(text, encoding="utf-8")
    if out.exists():
        _check_writable(out, overwrite)  # it may have been filled while we were writing
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)
    return count


def _extras(item: dict) -> dict:
    return {key: value for key, value in item.items() if key not in ("image", "text", "file_name")}


def _write_imagefolder(items: Iterable[dict], staging: Path, width: int, advance) -> int:
    (staging / "images").mkdir()
    count = 0
    with open(staging / "metadata.jsonl", "w", encoding="utf-8") as metadata:
        for count, item in enumerate(items, 1):
            file_name = f"images/{count - 1:0{width}d}.png"
            item["image"].save(staging / file_name)
            metadata.write(json.dumps({"file_name": file_name, "text": item["text"], **_extras(item)},
                                      ensure_ascii=False) + "\n")
            advance()
    return count


def _write_shards(items: Iterable[dict], staging: Path, width: int, advance) -> int:
    import webdataset

    count = 0
    with webdataset.ShardWriter(str(staging / "shard-%05d.tar"), maxcount=SHARD_SIZE, verbose=0) as sink:
        for count, item in enumerate(items, 1):
            sink.write({"__key__": f"{count - 1:0{width}d}", "png": item["image"], "txt": item["text"],
                        "json": {"text": item["text"], **_extras(item)}})
            advance()
    return count


def write_shapes(out: str | Path, n: int, seed: int = 0, size: int = 64,
                 task_weights: dict[str, float] | None = None, overwrite: bool = False,
                 format: str = "imagefolder", hold_out: HoldOut | None = None) -> int:
    """Render n shapes samples into a data set folder; each metadata row also carries the scene and the
    objects' regions. A hold-out is
    left out of the samples and recorded in HOLD_OUT_FILE, where `train` finds it."""
    dataset = ShapesDataset(n, seed, task_weights, size, hold_out)
    items = ({"image": item["image"], "text": item["text"], "scene": item["scene"].to_dict(),
              "regions": item["regions"]}
             for item in (dataset[i] for i in range(n)))
    extra_files = {HOLD_OUT_FILE: write_hold_out(hold_out)} if hold_out else None
    return write_dataset(items, out, total=n, overwrite=overwrite, extra_files=extra_files,
                         description="rendering shapes", format=format)


def write_emoji(out: str | Path, size: int = 64, limit: int | None = None,
                overwrite: bool = False, format: str = "imagefolder") -> emoji.EmojiBuild:
    """Build the emoji data set into a folder with its ATTRIBUTION file; returns the build (counts, skips)."""
    _check_writable(Path(out).expanduser(), overwrite)
    build = emoji.build_emoji(size, limit=limit, progress=True)
    items = ({"image": item.image, "text": item.text, "emoji": item.emoji, "codepoints": item.codepoints}
             for item in build.items)
    write_dataset(items, out, total=len(build.items), overwrite=overwrite,
                  extra_files={"ATTRIBUTION": emoji.attribution_text(size)}, description="writing emoji", format=format)
    return build


@dataclass
class Stats:
    min: float
    mean: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Stats":
        return cls(min(values), statistics.fmean(values), max(values)) if values else cls(0, 0, 0)


@dataclass
class Inspection:
    path: Path
    source: Source
    report: LoadReport
    words: Stats
    tokens: Stats                 # pieces after the Whitespace pre-tokenizer (a lower bound on BPE tokens)
    unique_captions: int
    widths: Stats
    heights: Stats
    modes: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)


def inspect_dataset(path: str | Path, options: DataOptions = DataOptions()) -> Inspection:
    """Index a data set (anything `locate` reads), then read every usable image's size, mode and format: counts,
    caption lengths, image sizes and every problem (per file, with its reason). Does not raise for an empty
    data set. Its counts are those `train` reports: both check images the same way while indexing."""
    source = locate(path, options)
    records, report = index_source(source, options)
    good: list[Record] = []
    widths, heights, modes, formats = [], [], Counter(), Counter()
    with progress_bar() as progress:
        for record in progress.track(records, description="decoding images"):
            try:
                with record.open() as image:
                    size, mode, image_format = image.size, image.mode, image.format
                    image.load()
            except Exception as error:  # a bad file is a finding of the inspection, not a failure of it
                report.skip(record.name, error_reason(error))
                continue
            good.append(record)
            widths.append(size[0])
            heights.append(size[1])
            modes[mode] += 1
            formats[image_format] += 1
    report.loaded = len(good)
    pre_tokenizer = Whitespace()
    captions = [record.text for record in good]
    return Inspection(
        path=source.path, source=source, report=report,
        words=Stats.of([len(text.split()) for text in captions]),
        tokens=Stats.of([len(pre_tokenizer.pre_tokenize_str(text)) for text in captions]),
        unique_captions=len(set(captions)),
        widths=Stats.of(widths), heights=Stats.of(heights), modes=modes, formats=formats,
    )


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + "…"
    return lines


def preview_grid(items: list[dict], cell: int = 128, columns: int | None = None, caption_lines: int = 3,
                 font_size: int = 11) -> Image.Image:
    """A grid of images {"image", "text"} with each caption wrapped under its image."""
    if not items:
        raise BrushworkError("nothing to preview: the data set is empty")
    columns = columns or math.ceil(math.sqrt(len(items)))
    rows = math.ceil(len(items) / columns)
    font = ImageFont.load_default(size=font_size)
    line_height = font_size + 3
    pad = 4
    cell_height = cell + pad + caption_lines * line_height + pad
    grid = Image.new("RGB", (columns * (cell + pad) + pad, rows * cell_height + pad), "white")
    draw = ImageDraw.Draw(grid)
    for index, item in enumerate(items):
        x = pad + (index % columns) * (cell + pad)
        y = pad + (index // columns) * cell_height
        image = item["image"].convert("RGB")
        # Small images (64 px data) are enlarged with NEAREST so their pixels stay crisp.
        upscale = max(image.size) < cell
        image = ImageOps.contain(image, (cell, cell),
                                 Image.Resampling.NEAREST if upscale else Image.Resampling.BICUBIC)
        grid.paste(image, (x + (cell - image.width) // 2, y + (cell - image.height) // 2))
        draw.rectangle((x - 1, y - 1, x + cell, y + cell), outline=(200, 200, 200))
        for line_number, line in enumerate(_wrap(item["text"], font, cell, caption_lines)):
            draw.text((x, y + cell + pad + line_number * line_height), line, fill="black", font=font)
    return grid


def write_preview(source, out: str | Path, n: int = 16, seed: int = 0, cell: int = 128) -> Path:
    """Pick n items of a raw source (evenly at random, reproducible by seed) and save their grid as PNG."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".png":
        raise BrushworkError(f"preview output must be a .png file, got {out}")
    if n < 1:
        raise BrushworkError(f"the number of preview samples must be at least 1, got {n}")
    indices = sorted(random.Random(seed).sample(range(len(source)), min(n, len(source))))
    grid = preview_grid([source[i] for i in indices], cell=cell)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
