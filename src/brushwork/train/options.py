"""Training options, each written once: a dataclass field holds its default, its help text and its flag.

`brushwork train ...` declares its Typer options from these fields (commands/train.py) and reads the same
names, the field names, from a TOML or YAML file (`--config FILE`); the command line recorded in training.json
and the model card is written back from them. Fields without flags (e.g. `command`) are set by code only.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path

from brushwork.errors import BrushworkError


def option(default, *flags: str, help: str):
    """A dataclass field that is a command-line option (flags[0] is its long flag) and a config-file key."""
    return dataclasses.field(default=default, metadata={"flags": flags, "help": help})


def option_fields(config_class: type) -> dict[str, dataclasses.Field]:
    """The fields of `config_class` that are options, by name."""
    return {f.name: f for f in dataclasses.fields(config_class) if "flags" in f.metadata}


@dataclasses.dataclass(kw_only=True)
class SharedConfig:
    """The options every `brushwork train` command takes."""

    data: str | None = option(None, "--data", "-d", help="'shapes', 'emoji', or a data set: a folder, shards, "
                              "parquet or a `datasets` save_to_disk folder (see `brushwork data inspect`).")
    split: str | None = option(None, "--split", help="Split of a split data set (default: train).")
    image_column: str | None = option(None, "--image-column", help="Column holding the images (default: image, "
                                      "img, png, jpg, ...).")
    caption_column: str | None = option(None, "--caption-column", help="Column holding the captions (default: "
                                        "text, caption, prompt, ...).")
    out: Path | None = option(None, "--out", "-o", help="Model folder to write (diffusers layout).")
    batch_size: int | None = option(None, "--batch-size", help="Images per step (default: the size's).")
    n: int | None = option(None, "--n", help="Use this many items (shapes: images to draw; default 100000).")
    work: Path | None = option(None, "--work",
                               help="Folder for checkpoints, logs and samples (default: OUT.runs beside OUT).")
    resume: bool = option(False, "--resume", help="Continue an interrupted training in OUT.")
    seed: int = option(0, "--seed", help="Seed of the data and of training.")
    mixed_precision: str = option("auto", "--precision", help="Mixed precision: auto, no, bf16, fp16.")
    ema_decay: float = option(0.999, "--ema-decay",
                              help="EMA decay of the generator's weights (UNet or GAN G); 0 turns it off.")
    checkpoint_every: int = option(500, "--checkpoint-every", help="Steps between checkpoints.")
    sample_every: int = option(500, "--sample-every", help="Steps between sample grids; 0: never.")
    num_workers: int = option(0, "--workers", help="Data loader worker processes.")
    max_minutes: float | None = option(None, "--max-minutes",
                                       help="Wall-clock budget of the whole command in minutes (the recipe splits "
                                       "it: CLIP 15%, VAE 20%, UNet 65%); training stops with a checkpoint, saved "
                                       "as if its steps were done, when its time is spent; --resume goes on.")
    report_to: str = option("none", "--report-to", help="Also log losses, lr and sample grids to tensorboard, "
                            "wandb (offline unless WANDB_MODE says), all or none; log.jsonl is always written.")
    command: str = ""  # the command line that trains with these settings, for the model card


def runs_folder(out: Path) -> Path:
    """Where a model's training runs (checkpoints with pickled optimizer state, logs, samples) go without --work:
    beside the model folder, OUT.runs/, so that the folder one shares or uploads holds none of them. A model
    trained before keeps its OUT/runs/."""
    out = Path(os.path.abspath(out))
    return out / "runs" if (out / "runs").is_dir() else out.parent / f"{out.name}.runs"


def stop_time(started: float, max_minutes: float | None) -> float | None:
    """When a one-stage command that started at `started` (time.time()) must stop training to keep to --max-minutes
    (a little is left for writing the model)."""
    return None if max_minutes is None else started + max_minutes * 60 - min(30.0, 0.05 * max_minutes * 60)


def settings(config) -> dict:
    """The options of `config` as JSON values (paths as strings), for training.json."""
    values = {name: getattr(config, name) for name in option_fields(type(config))}
    return {name: str(value) if isinstance(value, Path) else value for name, value in values.items()}


def read_config_file(path: Path, config_class: type) -> dict:
    """The options a TOML (.toml) or YAML (.yaml, .yml) file sets, by field name, checked against
    `config_class`: BrushworkError for an unreadable file, an unknown key or a value of the wrong type."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise BrushworkError(f"cannot read config file {path}: {error.strerror}.") from None
    if path.suffix == ".toml":
        import tomllib  # Python 3.11+

        parse, parse_errors = tomllib.loads, tomllib.TOMLDecodeError
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        parse, parse_errors = yaml.safe_load, yaml.YAMLError
    else:
        raise BrushworkError(f"config file {path}: name it .toml, .yaml or .yml.")
    try:
        values = parse(text) or {}
    except parse_errors as error:
        raise BrushworkError(f"config file {path} is not valid: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise BrushworkError(f"config file {path} must hold a table of option names and values.")
    known = option_fields(config_class)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise BrushworkError(f"config file {path} has unknown keys: {', '.join(unknown)}. Known keys: "
                             f"{', '.join(known)}.")
    types_ = typing.get_type_hints(config_class)
    return {name: _typed(value, types_[name], f"{path}: {name}") for name, value in values.items()}


def _typed(value, kind, where: str):
    """`value` as the field type `kind` (int, float, str, bool or Path, or one of them | None)."""
    allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None and type(None) in allowed:
        return None
    base = next(t for t in allowed if t is not type(None))
    if base is Path and isinstance(value, str):
        return Path(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, base) and not (base is not bool and isinstance(value, bool)):
        return value
    raise BrushworkError(f"{where} must be {'a path' if base is Path else base.__name__}, got {value!r}.")
