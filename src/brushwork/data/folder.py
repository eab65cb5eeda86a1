"""The user's own image-caption data: a folder or WebDataset `.tar` shards, with a report of every problem.

Layouts read:
- a folder with `metadata.jsonl` (or `metadata.csv`) whose rows have `file_name` and `text`
  (Hugging Face imagefolder; `caption` is accepted in place of `text`),
- a folder of images with a `.txt` caption beside each one (same stem),
- a `.tar` shard or a folder of them: members `KEY.png|jpg|jpeg|webp` with `KEY.txt` or `KEY.json`
  (`{"text": ...}` or `{"caption": ...}`), read in place with tarfile (nothing is extracted to disk).

Bad data never stops a long run: every image is checked when the data set is indexed (header, size limits,
`verify()`), bad files are skipped and reported by name with a reason, and an image that still fails to
decode later is replaced by the next readable one and recorded.
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
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
MIN_SIDE = 8                          # smaller images carry no usable detail
MAX_PIXELS = Image.MAX_IMAGE_PIXELS   # Pillow's decompression-bomb threshold (about 89 Mpx)
PROGRESS_FROM = 2000                  # show a progress bar when indexing at least this many files


def progress_bar(disable: bool = False) -> Progress:
    """A progress bar on stderr (stdout stays clean for results); hidden when stderr is not a terminal."""
    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=disable or not console.is_terminal)


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


@dataclass(frozen=True)
class Record:
    """One usable image-caption pair: a file on disk, or a member of a tar shard (offset and size)."""

    name: str
    text: str
    path: Path
    offset: int | None = None
    size: int | None = None

    def open(self) -> Image.Image:
        if self.offset is None:
            return Image.open(self.path)
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            return Image.open(io.BytesIO(file.read(self.size)))


def clean_caption(text: object) -> str:
    """Captions are single-line plain text: whitespace runs (newlines included) become one space."""
    return " ".join(text.split()) if isinstance(text, str) else ""


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


def open_checked(opener, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS) -> str | None:
    """Cheap index-time check: read the header, apply the size limits, then `verify()` the data.
    Returns the problem, or None when the image looks usable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with opener() as image:
                problem = size_problem(*image.size, min_side, max_pixels)
                if problem is None:
                    image.verify()
                return problem
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


def _read_metadata(root: Path, report: LoadReport) -> dict[str, object]:
    """file_name -> raw caption from metadata.jsonl / metadata.csv (problems go to the report)."""
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
            captions[file_name] = row.get("text", row.get("caption"))
    return captions


def index_folder(root: Path, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS
                 ) -> tuple[list[Record], LoadReport]:
    """Records for a folder in imagefolder (metadata.jsonl/csv) or `.txt`-caption layout."""
    report = LoadReport()
    images = sorted(
        path.relative_to(root).as_posix() for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    use_metadata = any((root / name).is_file() for name in METADATA_FILES)
    captions = _read_metadata(root, report) if use_metadata else {}
    for file_name in sorted(set(captions) - set(images)):
        report.skip(file_name, "missing file: listed in metadata but not found (or not an image type)")

    records = []
    with progress_bar(disable=len(images) < PROGRESS_FROM) as progress:
        for file_name in progress.track(images, description="checking images"):
            path = root / file_name
            text, problem = _folder_caption(path, file_name, captions if use_metadata else None)
            if problem is None:
                problem = open_checked(lambda: Image.open(path), min_side, max_pixels)
            if problem is not None:
                report.skip(file_name, problem)
                continue
            records.append(Record(file_name, text, path))
    report.loaded = len(records)
    return records, report


def _folder_caption(path: Path, file_name: str, captions: dict[str, object] | None) -> tuple[str, str | None]:
    """(caption, problem) for an image: from the metadata rows, or else from the .txt file beside it."""
    if captions is not None:
        if file_name not in captions:
            return "", "no caption: not listed in metadata"
        text = clean_caption(captions[file_name])
    else:
        caption_path = path.with_suffix(".txt")
        if not caption_path.is_file():
            return "", f"no caption: {caption_path.name} not found"
        try:
            text = clean_caption(caption_path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError:
            return "", f"bad caption: {caption_path.name} is not UTF-8 text"
    return text, None if text else "empty caption"


def _shard_caption(data: bytes, extension: str) -> str:
    text = data.decode("utf-8-sig")
    if extension == "json":
        value = json.loads(text)
        text = value.get("text", value.get("caption")) if isinstance(value, dict) else None
    return clean_caption(text)


def _index_shard(shard: Path, records: list[Record], report: LoadReport, min_side: int, max_pixels: int) -> None:
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:  # plain tar only: members are read in place by offset
            try:
                for member in tar:
                    if member.isfile():
                        directory, _, base = member.name.rpartition("/")
                        stem, _, extension = base.partition(".")
                        key = f"{directory}/{stem}" if directory else stem
                        groups.setdefault(key, {})[extension.lower()] = member
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
                    text = _shard_caption(tar.extractfile(members[caption_extension]).read(), caption_extension)
                except (UnicodeDecodeError, json.JSONDecodeError, tarfile.TarError, OSError) as error:
                    report.skip(name, f"bad caption: {key}.{caption_extension} unreadable ({error})")
                    continue
                if not text:
                    report.skip(name, "empty caption")
                    continue
                problem = open_checked(lambda: Image.open(tar.extractfile(image_member)), min_side, max_pixels)
                if problem:
                    report.skip(name, problem)
                    continue
                records.append(Record(name, text, shard, image_member.offset_data, image_member.size))
    except tarfile.ReadError as error:
        report.skip(shard.name, f"unreadable shard: not an uncompressed tar file ({error})")


def index_shards(shards: list[Path], min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS
                 ) -> tuple[list[Record], LoadReport]:
    """Records for WebDataset-style `.tar` shards."""
    records: list[Record] = []
    report = LoadReport()
    with progress_bar(disable=len(shards) < 2) as progress:
        for shard in progress.track(shards, description="reading shards"):
            _index_shard(shard, records, report, min_side, max_pixels)
    report.loaded = len(records)
    return records, report


class FolderDataset(torch.utils.data.Dataset):
    """The user's data as a map-style dataset of {"image": RGB PIL.Image, "text": str, "name": str}.

    `path` is a folder (metadata.jsonl/csv or .txt captions), a `.tar` shard, or a folder of `.tar` shards.
    `report` lists every skipped file with its reason. Raises BrushworkError when nothing usable is found.
    """

    def __init__(self, path: str | Path, draft_side: int | None = None, min_side: int = MIN_SIDE,
                 max_pixels: int = MAX_PIXELS):
        self.path = Path(path).expanduser()
        self.draft_side = draft_side
        self.min_side = min_side
        self.max_pixels = max_pixels
        self.layout = detect_layout(self.path)
        if self.layout == "shards":
            shards = [self.path] if self.path.is_file() else sorted(self.path.glob("*.tar"))
            self.records, self.report = index_shards(shards, min_side, max_pixels)
        else:
            self.records, self.report = index_folder(self.path, min_side, max_pixels)
        self.failed: set[int] = set()
        if not self.records:
            found = "; ".join(f"{name}: {reason}" for name, reason in self.report.skipped[:5])
            raise BrushworkError(
                f"no usable image-caption pairs in {self.path} ({self.layout} layout): "
                + (f"{len(self.report.skipped)} skipped, e.g. {found}" if found else "nothing found")
                + ". Run `brushwork data inspect` on it to see every problem.")

    def __len__(self) -> int:
        return len(self.records)

    def captions(self) -> list[str]:
        return [record.text for record in self.records]

    def __getitem__(self, index: int) -> dict:
        # A file that passed the index-time check can still fail to decode (e.g. a truncated JPEG):
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
            return {"image": image, "text": record.text, "name": record.name}
        raise BrushworkError(f"no image in {self.path} could be decoded; run `brushwork data inspect` on it")


def detect_layout(path: Path) -> str:
    """"metadata", "captions" (.txt beside images) or "shards"; BrushworkError if none fits."""
    if path.is_file():
        if path.suffix.lower() == ".tar":
            return "shards"
        raise BrushworkError(f"{path} is a file but not a .tar shard; give a folder of images or a .tar file")
    if not path.is_dir():
        raise BrushworkError(f"data set path not found: {path}")
    if any((path / name).is_file() for name in METADATA_FILES):
        return "metadata"
    has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*") if p.is_file())
    if not has_images and any(path.glob("*.tar")):
        return "shards"
    if not has_images:
        raise BrushworkError(
            f"no images, metadata.jsonl or .tar shards in {path}; expected images with metadata.jsonl "
            f"(file_name, text), images with a .txt caption beside each, or WebDataset .tar shards")
    return "captions"
