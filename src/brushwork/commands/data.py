"""`brushwork data ...`: write the built-in data sets to folders, inspect and preview any data set."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from brushwork.data.holdout import HoldOut
from brushwork.errors import BrushworkError

app = typer.Typer(help="Write, inspect and preview image-caption data sets.", no_args_is_help=True)
console = Console()

Out = Annotated[Path, typer.Option("--out", "-o", help="Folder to write (must be empty or new).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")]
Format = Annotated[str, typer.Option("--format", help="imagefolder (images/ + metadata.jsonl) or webdataset "
                                     "(shard-NNNNN.tar files).")]
Split = Annotated[str | None, typer.Option("--split", help="Split of a split folder, DatasetDict or parquet "
                                           "set (default: train).")]
ImageColumn = Annotated[str | None, typer.Option("--image-column", help="Column holding the images "
                                                 "(default: image, img, png, jpg, ...).")]
CaptionColumn = Annotated[str | None, typer.Option("--caption-column", help="Column holding the captions "
                                                   "(default: text, caption, prompt, ...).")]


def parse_task_weights(text: str | None) -> dict[str, float] | None:
    """"single=1,counting=2" -> {"single": 1.0, "counting": 2.0}."""
    if not text:
        return None
    weights = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError(part)
            weights[name.strip()] = float(value)
        except ValueError:
            raise BrushworkError(
                f"--tasks: expected NAME=WEIGHT pairs like single=1,counting=2, got {part!r}") from None
    return weights


@app.command()
def shapes(
    n: Annotated[int, typer.Option("--n", help="Number of images.")],
    out: Out,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same images.")] = 0,
    size: Annotated[int, typer.Option(help="Canvas side in pixels (at least 48).")] = 64,
    tasks: Annotated[str | None, typer.Option(
        help="Task weights, e.g. single=1,two_objects=1,counting=2,position=1 (default: equal).")] = None,
    hold_out: Annotated[str | None, typer.Option(
        "--hold-out", help="Combinations to leave out, comma-separated, e.g. \"purple triangle,red square left of "
        "*,four circles\" (see docs/creativity.md); `eval` scores them apart as unseen.")] = None,
    overwrite: Overwrite = False,
    format: Format = "imagefolder",
) -> None:
    """Render N shapes images with captions (and each scene as data) into a folder."""
    if n < 1:
        raise BrushworkError(f"--n must be at least 1, got {n}")
    from brushwork.data import io  # torch: only when the command runs

    held_out = HoldOut.parse(hold_out) if hold_out else None
    count = io.write_shapes(out, n, seed=seed, size=size, task_weights=parse_task_weights(tasks),
                            overwrite=overwrite, format=format, hold_out=held_out)
    console.print(f"wrote {count} shapes images to {out}")
    if held_out:
        console.print(f"held out {len(held_out.captions())} captions: {', '.join(held_out.texts)}", highlight=False)


@app.command()
def emoji(
    out: Out,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    limit: Annotated[int | None, typer.Option(help="Stop after this many emoji (for a quick try).")] = None,
    overwrite: Overwrite = False,
    format: Format = "imagefolder",
) -> None:
    """Render the OpenMoji emoji with their CLDR names into a folder (with its CC BY-SA 4.0 ATTRIBUTION)."""
    if size < 8:
        raise BrushworkError(f"--size must be at least 8 px, got {size}")
    if limit is not None and limit < 1:
        raise BrushworkError(f"--limit must be at least 1, got {limit}")
    from brushwork.data import io
    from brushwork.data.emoji import ATTRIBUTION

    build = io.write_emoji(out, size=size, limit=limit, overwrite=overwrite, format=format)
    skipped = ", ".join(f"{reason}: {count}" for reason, count in build.skipped_by_reason().most_common())
    console.print(f"built {len(build.items)} emoji into {out}; skipped {len(build.skipped)}"
                  + (f" ({skipped})" if skipped else ""))
    console.print(ATTRIBUTION, highlight=False)


def _stats_row(table: Table, name: str, stats) -> None:
    table.add_row(name, f"{stats.min:g}", f"{stats.mean:.1f}", f"{stats.max:g}")


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="Data set folder, shard(s), parquet file or save_to_disk folder.")],
    problems: Annotated[int, typer.Option(help="Show at most this many problems (0: all).")] = 0,
    split: Split = None,
    image_column: ImageColumn = None,
    caption_column: CaptionColumn = None,
) -> None:
    """Counts, caption lengths, image sizes and every problem found (per file, with its reason)."""
    from brushwork.data import io
    from brushwork.data.folder import DataOptions

    found = io.inspect_dataset(path, DataOptions(split, image_column, caption_column))
    report = found.report
    console.print(f"data set: {found.path} ({found.source.describe()})", soft_wrap=True, highlight=False)
    console.print(f"usable image-caption pairs: {report.loaded}\nproblems: {len(report.skipped)}\n"
                  f"distinct captions: {found.unique_captions}")
    table = Table("", "min", "mean", "max")
    _stats_row(table, "caption words", found.words)
    _stats_row(table, "caption tokens (pre-BPE)", found.tokens)
    _stats_row(table, "image width", found.widths)
    _stats_row(table, "image height", found.heights)
    console.print(table)
    if found.modes:
        console.print("modes: " + ", ".join(f"{mode} {count}" for mode, count in found.modes.most_common())
                      + "; formats: " + ", ".join(f"{fmt} {count}" for fmt, count in found.formats.most_common()))
    for line in report.problem_lines(problems):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


@app.command()
def preview(
    path: Annotated[str, typer.Argument(help="Data set folder, .tar shard(s), or 'shapes' / 'emoji'.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path("grid.png"),
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 16,
    seed: Annotated[int, typer.Option(help="Which samples: the same seed picks the same ones.")] = 0,
    split: Split = None,
    image_column: ImageColumn = None,
    caption_column: CaptionColumn = None,
) -> None:
    """Write a PNG grid of samples with their captions under each image."""
    from brushwork.data import io
    from brushwork.data.dataset import open_source
    from brushwork.data.folder import DataOptions

    source = open_source(path, n=max(n, 1000) if path == "shapes" else None,
                         options=DataOptions(split, image_column, caption_column))
    written = io.write_preview(source, out, n=n, seed=seed)
    console.print(f"wrote {written} ({min(n, len(source))} samples)")
