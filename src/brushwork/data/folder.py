"""The user's own image-caption data, with a report of every problem.

Layouts read (`locate` tells them apart):
- "metadata": a folder with `metadata.jsonl` (or `metadata.csv`) whose rows have `file_name` and a caption
  (Hugging Face imagefolder),
- "captions": a folder of images with a `.txt` caption beside each one (same stem),
- "shards": WebDataset shards: a `.tar` / `.tar.gz` file, a folder of them, or a brace list
  (`shard-{00000..00009}.tar`); members `KEY.png|jpg|jpeg|webp` with `KEY.txt` or `KEY.json`,
- "arrow": a `datasets` `save_to_disk` folder (a Dataset or a DatasetDict of splits),
- "parquet": a `.parquet` file or a folder of them (splits named as on the Hub: `data/train-00000-of-00001.parquet`).
A folder of split folders (`train/metadata.jsonl`, `test/...`) is read one split at a time (`--split`, default
train). Captions and images come from the usual column names unless `--caption-column` / `--image-column` say.

Bad data never stops a long run: every image is checked when the data set is indexed (header, size limits,
`verify()`, a full decode), bad files are skipped and reported by name with a reason, and an image that still
fails to decode later is replaced by the next readable one and recorded.
"""

import csv
import io
import json
import logging
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from brushwork.data.transforms import to_rgb
from brushwork.errors import BrushworkError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGE_COLUMNS = ("image", "img", "png", "jpg", "jpeg", "webp")            # tried in order when none is named
CAPTION_COLUMNS = ("text", "caption", "prompt", "txt", "description", "sentence")
DEFAULT_SPLIT = "train"
MIN_SIDE = 8                          # smaller images carry no usable detail
MAX_PIXELS = Image.MAX_IMAGE_PIXELS   # Pillow's decompression-bomb threshold (about 89 Mpx)
PROGRESS_FROM = 2000                  # show a progress bar when indexing at least this many files


def progress_bar(disable: bool = False) -> Progress:
    """A progress bar on stderr (stdout stays clean for results); hidden when stderr is not a terminal."""
    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=disable or not console.is_terminal)


@dataclass(frozen=True)
class DataOptions:
    """Which part of a data set to read: a split, and the columns holding images and captions (None: the usual
    names, IMAGE_COLUMNS and CAPTION_COLUMNS)."""

    split: str | None = None
    image_column: str | None = None
    caption_column: str | None = None


@dataclass
class LoadReport:
    """What indexing (and later loading) found: how many items are usable and which files were skipped."""

    loaded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append((name, reason))

    def reasons(self) -> Counter:
        """Skipped counts by kind of reason (the text before the first colon)."""
        return Counter(reason.split(":")[0] for _, reason in self.skipped)

    def summary(self) -> str:
        text = f"{self.loaded} loaded, {len(self.skipped)} skipped"
        if self.skipped:
            text += " (" + ", ".join(f"{kind}: {count}" for kind, count in self.reasons().most_common()) + ")"
        return text

    def problem_lines(self, limit: int = 0) -> list[str]:
        """The problems as `data inspect` prints them: a heading with counts by kind, then one line per file
        (at most `limit`, 0: all)."""
        if not self.skipped:
            return []
        kinds = ", ".join(f"{kind} {count}" for kind, count in self.reasons().most_common())
        shown = self.skipped if limit == 0 else self.skipped[:limit]
        lines = [f"problems ({kinds}):"] + [f"  {name}: {reason}" for name, reason in shown]
        if len(shown) < len(self.skipped):
            lines.append(f"  ... and {len(self.skipped) - len(shown)} more")
        return lines

    def to_json(self, limit: int = 100) -> dict:
        """For training.json: the counts, and the first `limit` skipped files with their reasons."""
        return {"usable": self.loaded, "skipped": len(self.skipped), "reasons": dict(self.reasons().most_common()),
                "skipped_files": [list(pair) for pair in self.skipped[:limit]]}


class TableImages:
    """The image column of a `datasets` table, read undecoded one row at a time: bytes, or a file path."""

    def __init__(self, table, column: str, root: Path):
        import datasets

        if isinstance(table.features[column], datasets.Image):
            table = table.cast_column(column, datasets.Image(decode=False))
        self.table, self.column, self.root = table.select_columns([column]), column, root

    def __getitem__(self, row: int) -> bytes | Path | None:
        value = self.table[row][self.column]
        if isinstance(value, dict):   # datasets' Image feature: {"bytes", "path"}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str):
            return self.root / value
        return value if isinstance(value, bytes) else None


@dataclass(frozen=True)
class Record:
    """One usable image-caption pair: a file on disk, a member of an uncompressed tar shard (offset and size),
    bytes held in memory (a member of a compressed shard), or a row of a table."""

    name: str
    text: str
    path: Path | None = None
    offset: int | None = None
    size: int | None = None
    data: bytes | None = field(default=None, repr=False)
    table: TableImages | None = field(default=None, repr=False)
    row: int | None = None
    regions: tuple | None = field(default=None, repr=False)   # metadata "regions": phrases and their boxes

    def open(self) -> Image.Image:
        if self.table is not None:
            value = self.table[self.row]
            if value is None:
                raise ImageProblem("no image: the image cell is empty")
            return Image.open(io.BytesIO(value) if isinstance(value, bytes) else value)
        if self.data is not None:
            return Image.open(io.BytesIO(self.data))
        if self.offset is None:
            return Image.open(self.path)
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            return Image.open(io.BytesIO(file.read(self.size)))


def caption_text(value: object) -> tuple[str, str | None]:
    """(caption, problem) for a caption value read from a file, a metadata row or a table cell. Captions are
    single-line plain text: whitespace runs (newlines included) become one space; a number is its digits."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is None:
        return "", "no caption: the caption is null"
    if not isinstance(value, str):
        return "", f"bad caption: a {type(value).__name__}, not text"
    text = " ".join(value.split())
    return text, None if text else "empty caption"


def clean_caption(text: object) -> str:
    return caption_text(text)[0]


def size_problem(width: int, height: int, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS) -> str | None:
    if min(width, height) < min_side:
        return f"too small: {width}x{height} px (shorter side must be at least {min_side} px)"
    if width * height > max_pixels:
        return (f"too large: {width}x{height} px = {width * height / 1e6:.0f} Mpx, over the "
                f"{max_pixels / 1e6:.0f} Mpx decompression-bomb limit")
    return None


class ImageProblem(ValueError):
    """A decoded image that breaks a limit; its message is the reason."""


def error_reason(error: Exception) -> str:
    """A short reason for a file Pillow could not read."""
    if isinstance(error, ImageProblem):
        return str(error)
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image: unrecognised or corrupt header"
    if isinstance(error, Image.DecompressionBombError):
        return f"too large: over the decompression-bomb limit ({str(error).split(',')[0]})"
    message = str(error) or type(error).__name__
    if "truncated" in message.lower() or isinstance(error, EOFError):
        return f"truncated: {message}"
    return f"unreadable: {message}"


def open_checked(opener, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS,
                 draft_side: int | None = None) -> str | None:
    """Index-time check: read the header, apply the size limits, `verify()` the data, then decode it (a JPEG at
    the reduced scale `draft_side` allows), so that the usable count is what training can read. Returns the
    problem, or None when the image is usable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with opener() as image:
                problem = size_problem(*image.size, min_side, max_pixels)
                if problem is not None:
                    return problem
                image.verify()
            with opener() as image:   # verify() leaves the image unusable: decode a fresh one
                if draft_side is not None and image.format == "JPEG":
                    image.draft(image.mode, (draft_side, draft_side))
                image.load()
            return None
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...) for bad files
        return error_reason(error)


def load_image(record: Record, draft_side: int | None = None, min_side: int = MIN_SIDE,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode fully and convert to upright RGB. `draft_side` lets JPEG decode at a reduced scale that keeps
    the shorter side at least that long (a large speed-up for big photos). Raises on any problem."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = record.open()
        problem = size_problem(*image.size, min_side, max_pixels)
        if problem is not None:
            raise ImageProblem(problem)
        if draft_side is not None and image.format == "JPEG":
            image.draft(image.mode, (draft_side, draft_side))
        image.load()
    return to_rgb(image)


def pick_column(columns: list[str], wanted: str | None, usual: tuple[str, ...], what: str, where: str) -> str:
    """The column named `wanted`, else the first of the `usual` names present; BrushworkError naming the columns."""
    if wanted is not None:
        if wanted in columns:
            return wanted
        raise BrushworkError(f"{where} has no column {wanted!r}; its columns are {', '.join(columns) or 'none'}.")
    found = next((name for name in usual if name in columns), None)
    if found is None:
        flag = "--image-column" if what == "image" else "--caption-column"
        raise BrushworkError(f"{where} has no {what} column (looked for {', '.join(usual)}); its columns are "
                             f"{', '.join(columns) or 'none'}: name one with {flag}.")
    return found


@dataclass
class Checks:
    """The limits every image is checked against while indexing."""

    min_side: int = MIN_SIDE
    max_pixels: int = MAX_PIXELS
    draft_side: int | None = None

    def problem(self, record: Record) -> str | None:
        return open_checked(record.open, self.min_side, self.max_pixels, self.draft_side)


def _metadata_caption(row: dict, column: str | None) -> object:
    if column is not None:
        return row.get(column)
    return next((row[name] for name in CAPTION_COLUMNS if name in row), None)


def _read_metadata(root: Path, report: LoadReport, caption_column: str | None,
                   regions: dict[str, tuple] | None = None) -> dict[str, object]:
    """file_name -> raw caption from metadata.jsonl / metadata.csv (problems go to the report). Rows' optional
    "regions" lists go into `regions`."""
    captions: dict[str, object] = {}
    for metadata_name in METADATA_FILES:
        path = root / metadata_name
        if not path.is_file():
            continue
        if metadata_name.endswith(".jsonl"):
            rows = []
            for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    report.skip(f"{metadata_name}:{number}", f"bad metadata: not valid JSON ({error.msg})")
        else:
            with open(path, newline="", encoding="utf-8-sig") as file:
                rows = list(enumerate(csv.DictReader(file), 2))
        for number, row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                report.skip(f"{metadata_name}:{number}", "bad metadata: row has no 'file_name'")
                continue
            file_name = Path(row["file_name"]).as_posix()
            if file_name in captions:
                report.skip(file_name, f"bad metadata: listed twice in {metadata_name}, the later row is used")
            captions[file_name] = _metadata_caption(row, caption_column)
            if regions is not None and isinstance(row.get("regions"), list):
                regions[file_name] = tuple(row["regions"])
    return captions


def index_folder(root: Path, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS,
                 options: DataOptions = DataOptions(), draft_side: int | None = None
                 ) -> tuple[list[Record], LoadReport]:
    """Records for a folder in imagefolder (metadata.jsonl/csv) or `.txt`-caption layout."""
    report, checks = LoadReport(), Checks(min_side, max_pixels, draft_side)
    images = sorted(
        path.relative_to(root).as_posix() for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    use_metadata = any((root / name).is_file() for name in METADATA_FILES)
    regions: dict[str, tuple] = {}
    captions = _read_metadata(root, report, options.caption_column, regions) if use_metadata else {}
    for file_name in sorted(set(captions) - set(images)):
        report.skip(file_name, "missing file: listed in metadata but not found (or not an image type)")

    records = []
    with progress_bar(disable=len(images) < PROGRESS_FROM) as progress:
        for file_name in progress.track(images, description="checking images"):
            path = root / file_name
            text, problem = _folder_caption(path, file_name, captions if use_metadata else None)
            record = Record(file_name, text, path, regions=regions.get(file_name))
            problem = problem or checks.problem(record)
            if problem is not None:
                report.skip(file_name, problem)
                continue
            records.append(record)
    report.loaded = len(records)
    return records, report


def _folder_caption(path: Path, file_name: str, captions: dict[str, object] | None) -> tuple[str, str | None]:
    """(caption, problem) for an image: from the metadata rows, or else from the .txt file beside it."""
    if captions is not None:
        if file_name not in captions:
            return "", "no caption: not listed in metadata"
        return caption_text(captions[file_name])
    caption_path = path.with_suffix(".txt")
    if not caption_path.is_file():
        return "", f"no caption: {caption_path.name} not found"
    try:
        return caption_text(caption_path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        return "", f"bad caption: {caption_path.name} is not UTF-8 text"


def _shard_caption(data: bytes, extension: str, caption_column: str | None) -> tuple[str, str | None]:
    text = data.decode("utf-8-sig")
    if extension == "json":
        value = json.loads(text)
        return caption_text(_metadata_caption(value, caption_column) if isinstance(value, dict) else None)
    return caption_text(text)


def _shard_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member as webdataset groups them: the key ends at the first dot of the base name."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _index_shard(shard: Path, records: list[Record], report: LoadReport, checks: Checks,
                 caption_column: str | None) -> None:
    # Hand-written on tarfile rather than webdataset's streaming reader: training needs random access, which
    # an uncompressed shard gives in place (each image's offset); a compressed one is held in memory.
    compressed = not shard.name.lower().endswith(".tar")
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard, "r:gz" if compressed else "r:") as tar:
            try:
                for member in tar:
                    if member.isfile():
                        key, extension = _shard_key(member.name)
                        groups.setdefault(key, {})[extension] = member
            except (tarfile.TarError, EOFError, OSError) as error:
                report.skip(shard.name, f"truncated shard: stopped reading after {len(groups)} keys ({error})")
            for key, members in groups.items():
                name = f"{shard.name}:{key}"
                image_member = next((members[e] for e in TAR_IMAGE_EXTENSIONS if e in members), None)
                caption_extension = next((e for e in ("txt", "json") if e in members), None)
                if image_member is None:
                    report.skip(name, "no image: key has no .png/.jpg/.jpeg/.webp member")
                    continue
                if caption_extension is None:
                    report.skip(name, "no caption: key has no .txt or .json member")
                    continue
                try:
                    text, problem = _shard_caption(tar.extractfile(members[caption_extension]).read(),
                                                   caption_extension, caption_column)
                    data = tar.extractfile(image_member).read() if compressed else None
                except (UnicodeDecodeError, json.JSONDecodeError, tarfile.TarError, OSError, EOFError) as error:
                    report.skip(name, f"bad caption: {key}.{caption_extension} unreadable ({error})")
                    continue
                record = Record(name, text, shard, None if compressed else image_member.offset_data,
                                image_member.size, data=data)
                problem = problem or checks.problem(record)
                if problem:
                    report.skip(name, problem)
                    continue
                records.append(record)
    except (tarfile.ReadError, EOFError, OSError) as error:
        kind = "gzip-compressed" if compressed else "uncompressed"
        report.skip(shard.name, f"unreadable shard: not an {kind} tar file ({error})")


def index_shards(shards: list[Path], min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS,
                 options: DataOptions = DataOptions(), draft_side: int | None = None
                 ) -> tuple[list[Record], LoadReport]:
    """Records for WebDataset-style `.tar` / `.tar.gz` shards."""
    records: list[Record] = []
    report, checks = LoadReport(), Checks(min_side, max_pixels, draft_side)
    with progress_bar(disable=len(shards) < 2) as progress:
        for shard in progress.track(shards, description="reading shards"):
            _index_shard(shard, records, report, checks, options.caption_column)
    report.loaded = len(records)
    return records, report


def index_table(table, name: str, root: Path, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS,
                options: DataOptions = DataOptions(), draft_side: int | None = None
                ) -> tuple[list[Record], LoadReport]:
    """Records for a `datasets.Dataset` (arrow or parquet): row i is named `name[i]`."""
    report, checks = LoadReport(), Checks(min_side, max_pixels, draft_side)
    columns = list(table.column_names)
    image_column = pick_column(columns, options.image_column, IMAGE_COLUMNS, "image", name)
    caption_column = pick_column(columns, options.caption_column, CAPTION_COLUMNS, "caption", name)
    images = TableImages(table, image_column, root)
    records = []
    with progress_bar(disable=len(table) < PROGRESS_FROM) as progress:
        for row, value in enumerate(progress.track(table[caption_column], description="checking images")):
            row_name = f"{name}[{row}]"
            text, problem = caption_text(value)
            record = Record(row_name, text, table=images, row=row)
            problem = problem or checks.problem(record)
            if problem is not None:
                report.skip(row_name, problem)
                continue
            records.append(record)
    report.loaded = len(records)
    return records, report


@dataclass
class Source:
    """Where a data set's items are and how they are laid out (see the module docstring)."""

    path: Path
    layout: str
    files: list[Path] = field(default_factory=list)   # shards or parquet files of the split
    root: Path | None = None                           # the folder read (a split's, for split folders)
    split: str | None = None
    splits: tuple[str, ...] = ()

    def describe(self) -> str:
        text = f"{self.layout} layout"
        if self.split is not None:
            text += f", split {self.split!r}" + (f" of {', '.join(self.splits)}" if len(self.splits) > 1 else "")
        return text


def _choose_split(path: Path, splits: list[str], wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in splits:
            raise BrushworkError(f"{path} has no split {wanted!r}; it is a split folder with {', '.join(splits)}.")
        return wanted
    if DEFAULT_SPLIT in splits or len(splits) == 1:
        return DEFAULT_SPLIT if DEFAULT_SPLIT in splits else splits[0]
    raise BrushworkError(f"{path} is a split folder with {', '.join(splits)} and no {DEFAULT_SPLIT!r}: "
                         "choose one with --split.")


def _is_shard(path: Path) -> bool:
    return path.name.lower().endswith(SHARD_SUFFIXES)


def _has_images(path: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*") if p.is_file())


def _brace_list(spec: str) -> list[Path]:
    import braceexpand

    paths = [Path(name).expanduser() for name in braceexpand.braceexpand(spec)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise BrushworkError(f"{len(missing)} of the {len(paths)} shards of {spec} are not found, e.g. {missing[0]}.")
    return paths


def locate(spec: str | Path, options: DataOptions = DataOptions()) -> Source:
    """The layout of the data set at `spec` (a path, or a WebDataset brace list) and the files of its split;
    BrushworkError when none fits, or when --split names a split of a data set that has none."""
    source = _locate(spec, options)
    if options.split is not None and source.split is None:
        raise BrushworkError(f"{source.path} has no splits ({source.layout} layout): leave out --split.")
    return source


def _locate(spec: str | Path, options: DataOptions) -> Source:
    path = Path(spec).expanduser()
    if not path.exists() and "{" in str(spec):
        return Source(path, "shards", _brace_list(str(spec)))
    if path.is_file():
        if _is_shard(path):
            return Source(path, "shards", [path])
        if path.suffix.lower() == ".parquet":
            return Source(path, "parquet", [path])
        raise BrushworkError(f"{path} is a file but not a .tar / .tar.gz shard or a .parquet file; give a folder "
                             "of images, a shard, a parquet file or a `datasets` save_to_disk folder")
    if not path.is_dir():
        raise BrushworkError(f"data set path not found: {path}")
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        return _locate_arrow(path, options)
    if any((path / name).is_file() for name in METADATA_FILES):
        return Source(path, "metadata", root=path)
    split_folders = sorted(p.name for p in path.iterdir()
                           if p.is_dir() and any((p / name).is_file() for name in METADATA_FILES))
    if split_folders:
        split = _choose_split(path, split_folders, options.split)
        return Source(path, "metadata", root=path / split, split=split, splits=tuple(split_folders))
    if not _has_images(path):
        if any(path.rglob("*.parquet")):
            return _locate_parquet(path, options)
        shards = sorted(p for p in path.iterdir() if p.is_file() and _is_shard(p))
        if shards:
            return Source(path, "shards", shards)
        raise BrushworkError(
            f"no images, metadata.jsonl, shards or parquet files in {path}; expected images with metadata.jsonl "
            f"(file_name, text), images with a .txt caption beside each, WebDataset .tar shards, parquet files "
            f"or a `datasets` save_to_disk folder")
    return Source(path, "captions", root=path)


def _locate_arrow(path: Path, options: DataOptions) -> Source:
    splits: tuple[str, ...] = ()
    if (path / "dataset_dict.json").is_file():
        try:
            splits = tuple(json.loads((path / "dataset_dict.json").read_text())["splits"])
        except (ValueError, KeyError, TypeError):
            raise BrushworkError(f"{path}/dataset_dict.json is not a `datasets` DatasetDict description.") from None
        return Source(path, "arrow", root=path, split=_choose_split(path, list(splits), options.split), splits=splits)
    return Source(path, "arrow", root=path)


def _locate_parquet(path: Path, options: DataOptions) -> Source:
    from datasets.data_files import DataFilesDict, get_data_patterns

    found = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))  # the Hub's split names
    splits = [str(name) for name in found]
    split = _choose_split(path, splits, options.split)
    files = [Path(name) for name in found[split] if name.endswith(".parquet")]
    if not files:
        raise BrushworkError(f"no .parquet files in split {split!r} of {path}.")
    return Source(path, "parquet", files, root=path, split=split, splits=tuple(splits))


def load_table(source: Source):
    """The `datasets.Dataset` of an arrow or parquet source (its split)."""
    import datasets
    import pyarrow
    import pyarrow.parquet

    try:
        if source.layout == "arrow":
            table = datasets.load_from_disk(str(source.path))
            return table[source.split] if source.split is not None else table
        # Read whole into memory with pyarrow: datasets' parquet builder would first copy it into its cache.
        return datasets.Dataset(pyarrow.concat_tables([pyarrow.parquet.read_table(f) for f in source.files]))
    except (OSError, ValueError, pyarrow.ArrowException, FileNotFoundError) as error:
        message = " ".join(str(error).split())
        raise BrushworkError(f"cannot read {source.path} as {source.layout} ({message}).") from None


def index_source(source: Source, options: DataOptions = DataOptions(), min_side: int = MIN_SIDE,
                 max_pixels: int = MAX_PIXELS, draft_side: int | None = None) -> tuple[list[Record], LoadReport]:
    """Records and the report of problems for a located data set."""
    limits = dict(min_side=min_side, max_pixels=max_pixels, options=options, draft_side=draft_side)
    if source.layout == "shards":
        return index_shards(source.files, **limits)
    if source.layout in ("arrow", "parquet"):
        name = source.split or source.path.stem
        return index_table(load_table(source), name, source.root or source.path.parent, **limits)
    return index_folder(source.root, **limits)


class FolderDataset(torch.utils.data.Dataset):
    """The user's data as a map-style dataset of {"image": RGB PIL.Image, "text": str, "name": str}.

    `path` is anything `locate` reads (a folder, shards, a brace list, parquet, a save_to_disk folder).
    `report` lists every skipped file with its reason. Raises BrushworkError when nothing usable is found.
    """

    def __init__(self, path: str | Path, draft_side: int | None = None, min_side: int = MIN_SIDE,
                 max_pixels: int = MAX_PIXELS, options: DataOptions = DataOptions()):
        self.source = locate(path, options)
        self.path = self.source.path
        self.draft_side = draft_side
        self.min_side = min_side
        self.max_pixels = max_pixels
        self.layout = self.source.layout
        self.records, self.report = index_source(self.source, options, min_side, max_pixels, draft_side)
        self.failed: set[int] = set()
        if not self.records:
            found = "; ".join(f"{name}: {reason}" for name, reason in self.report.skipped[:5])
            raise BrushworkError(
                f"no usable image-caption pairs in {self.path} ({self.source.describe()}): "
                + (f"{len(self.report.skipped)} skipped, e.g. {found}" if found else "nothing found")
                + ". Run `brushwork data inspect` on it to see every problem.")

    def __len__(self) -> int:
        return len(self.records)

    def captions(self) -> list[str]:
        return [record.text for record in self.records]

    def __getitem__(self, index: int) -> dict:
        # A file that passed the index-time check can still fail to decode (e.g. changed on disk since):
        # record it and deterministically use the next readable item, so a long run never stops on it.
        for step in range(len(self.records)):
            position = (index + step) % len(self.records)
            if position in self.failed:
                continue
            record = self.records[position]
            try:
                image = load_image(record, self.draft_side, self.min_side, self.max_pixels)
            except Exception as error:  # any decode failure of one file is data, not a crash
                self.failed.add(position)
                self.report.skip(record.name, error_reason(error))
                self.report.loaded -= 1
                logger.warning("skipping %s: %s", record.name, error_reason(error))
                continue
            item = {"image": image, "text": record.text, "name": record.name}
            if record.regions is not None:
                item["regions"] = list(record.regions)
            return item
        raise BrushworkError(f"no image in {self.path} could be decoded; run `brushwork data inspect` on it")


def detect_layout(path: Path) -> str:
    """"metadata", "captions", "shards", "arrow" or "parquet"; BrushworkError if none fits."""
    return locate(path).layout
