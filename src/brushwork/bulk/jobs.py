"""Bulk generation's input and record: a prompt file read into checked jobs, and the Parquet manifest.

A prompt file is `.txt` (a prompt per line), `.jsonl` or `.parquet` (a `prompt` per row, with optional `seed`,
`negative`, `steps`, `guidance` and `model`). Each row makes `per_row` images; image j of a row is job
`index = row_position * per_row + j` (counting valid and bad rows alike, so a fixed file gives fixed indices),
written to `{index:05d}.png`. Its seed is the row's seed + j, or else the run's base seed + index, as
`brushwork generate --prompts FILE --seed S` numbers them.

The manifest is a folder of Parquet files (`DIR/manifest/`), one per finished group of images, each written
whole or not at all; pyarrow, pandas, Ray or DuckDB read the folder as one table.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from brushwork.errors import BrushworkError

COLUMNS = ("prompt", "seed", "negative", "steps", "guidance", "model")
FORMATS = (".txt", ".jsonl", ".parquet")
MAX_SEED = 2**63 - 1
MANIFEST_SCHEMA = pa.schema([
    ("index", pa.int64()), ("row", pa.int64()), ("prompt", pa.string()), ("negative", pa.string()),
    ("seed", pa.int64()), ("steps", pa.int64()), ("guidance", pa.float64()), ("model", pa.string()),
    ("file", pa.string()), ("model_hash", pa.string()), ("time", pa.timestamp("s", tz="UTC")),
    ("seconds", pa.float64()), ("error", pa.string()),
])


@dataclass
class Job:
    """One image to make. row: the source row, counted from 1 (a line number for .txt and .jsonl)."""
    index: int
    row: int
    prompt: str
    seed: int
    negative: str = ""
    steps: int | None = None
    guidance: float = 5.0
    model: str | None = None

    def call_key(self) -> tuple:
        """Jobs with the same key can share one pipeline call."""
        return self.model, self.steps, self.guidance


@dataclass
class Defaults:
    """What a row without a column gets (the command's flags)."""
    seed: int = 0
    negative: str = ""
    steps: int | None = None
    guidance: float = 5.0
    model: str | None = None


def read_rows(path: Path) -> list[tuple[int, dict | None, str]]:
    """(row number, values, "") per row; (row number, None, why) for a row that cannot be read at all."""
    if not path.is_file():
        raise BrushworkError(f"prompts file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise BrushworkError(f"{path}: prompt files are {', '.join(FORMATS)}, not {suffix or 'without a suffix'}")
    if suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise BrushworkError(f"{path} is not a readable Parquet file: {e}") from None
        return [(n, values, "") for n, values in enumerate(table.to_pylist(), start=1)]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise BrushworkError(f"{path} is not UTF-8 text") from None
    numbered = [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
    if suffix == ".txt":
        return [(n, {"prompt": line}, "") for n, line in numbered]
    rows = []
    for n, line in numbered:
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append((n, None, f"not JSON ({e.msg})"))
            continue
        rows.append((n, value, "") if isinstance(value, dict) else (n, None, "not a JSON object"))
    return rows


def _int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low} to {high}, got {value}")
    return int(value)


def _row_values(values: dict, defaults: Defaults) -> dict:
    """The row's settings, defaults filled in; ValueError says what is wrong with it."""
    prompt = values.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("no prompt (a non-empty 'prompt' string)")
    negative = values.get("negative")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"negative must be text, got {negative!r}")
    model = values.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise ValueError(f"model must be a folder or a shipped model name, got {model!r}")
    guidance = values.get("guidance")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance) or guidance < 0):
        raise ValueError(f"guidance must be a number of at least 0, got {guidance!r}")
    seed, steps = values.get("seed"), values.get("steps")
    return {"prompt": prompt.strip(),
            "seed": None if seed is None else _int(seed, "seed", 0, MAX_SEED),
            "negative": defaults.negative if negative is None else negative,
            "steps": defaults.steps if steps is None else _int(steps, "steps", 1, 1000),
            "guidance": defaults.guidance if guidance is None else float(guidance),
            "model": defaults.model if model is None else model}


def plan_jobs(path: Path, defaults: Defaults, per_row: int = 1) -> tuple[list[Job], list[tuple[int, str]], list[str]]:
    """The jobs of a prompt file, the bad rows as (row, reason), and the columns it has that are not read."""
    rows = read_rows(path)
    if not rows:
        raise BrushworkError(f"{path} holds no prompts")
    jobs, bad, unknown = [], [], {}
    for position, (row, values, unreadable) in enumerate(rows):
        if values is None:
            bad.append((row, unreadable))
            continue
        unknown.update(dict.fromkeys(k for k in values if k not in COLUMNS))
        try:
            settings = _row_values(values, defaults)
        except ValueError as e:
            bad.append((row, str(e)))
            continue
        for j in range(per_row):
            index = position * per_row + j
            seed = settings["seed"] + j if settings["seed"] is not None else defaults.seed + index
            jobs.append(Job(index, row, **(settings | {"seed": seed})))
    return jobs, bad, list(unknown)


def groups_of(jobs: list[Job], size: int) -> list[list[Job]]:
    """Jobs grouped by index // size: a job's group (its batch) does not depend on which jobs are done, so an
    image is made in the same batch as `brushwork generate --prompts FILE --batch-size size` makes it."""
    groups: dict[int, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.index // size, []).append(job)
    return list(groups.values())


def manifest_dir(out: Path) -> Path:
    return out / "manifest"


def read_manifest(out: Path) -> pa.Table:
    """Every record written so far (an empty table with the manifest's columns if none)."""
    folder = manifest_dir(out)
    parts = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not parts:
        return MANIFEST_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(p, schema=MANIFEST_SCHEMA) for p in parts)


def write_manifest_part(out: Path, records: list[dict], name: str) -> Path:
    """Write records as one Parquet file, whole or not at all (a failed write leaves nothing behind)."""
    folder = manifest_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.parquet"
    temporary = folder / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA), temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def bad_row_records(bad: list[tuple[int, str]]) -> list[dict]:
    return [{"row": row, "error": reason} for row, reason in bad]


def job_record(job: Job) -> dict:
    return asdict(job)
