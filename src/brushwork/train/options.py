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
from brushwork.tokenizer import DEFAULT_VOCAB_SIZE

LOSSES = ("hinge", "nonsaturating")  # the GAN's adversarial losses
STAGES = ("clip", "vae", "unet")  # the recipe's stages, in order
# The recipe's default time budget: `brushwork train --data D --out M` ends within it on a 2-core CPU; on a GPU
# the step counts end it sooner.
DEFAULT_RECIPE_MINUTES = 150.0


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
    batch_size: int | None = option(None, "--batch-size", help="Images per step, of every stage the command trains "
                                    "(default: the size's; the recipe's small: CLIP 64, VAE 16, UNet 64).")
    n: int | None = option(None, "--n", help="Use this many items (shapes: images to draw; default 20000).")
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
                                       help="Wall-clock budget of the whole command in minutes: training stops "
                                       "with a checkpoint, saved as if its steps were done, when its time is spent; "
                                       "--resume goes on.")
    report_to: str = option("none", "--report-to", help="Also log losses, lr and sample grids to tensorboard, "
                            "wandb (offline unless WANDB_MODE says), all or none; log.jsonl is always written.")
    command: str = ""  # the command line that trains with these settings, for the model card


@dataclasses.dataclass(kw_only=True)
class RecipeConfig(SharedConfig):
    """The options of `brushwork train` and `train clip|vae|unet` (each subcommand takes those of its stage)."""

    size: str = option("small", "--size", help="Model size: tiny (tests), compact (small with fewer layers), "
                       "small (CPU, hours), base (GPU).")
    steps_clip: int | None = option(None, "--steps-clip", help="CLIP steps (default: the size's).")
    steps_vae: int | None = option(None, "--steps-vae", help="VAE steps (default: the size's).")
    steps_unet: int | None = option(None, "--steps-unet", help="UNet steps (default: the size's).")
    resolution: int | None = option(None, "--resolution", help="Image side in pixels (default: the size's, 64).")
    lr: float | None = option(None, "--lr", help="Peak learning rate (default 5e-4; lower suits --init).")
    # The next five are named as in diffusers' training scripts.
    lr_scheduler: str = option("cosine", "--lr-scheduler", help="Learning-rate schedule, as diffusers' "
                               "get_scheduler names them: constant (no warm-up), constant_with_warmup, cosine, "
                               "cosine_with_restarts, linear or polynomial. Under --max-minutes it ends where the "
                               "time is expected to run out.")
    lr_warmup_steps: int | None = option(None, "--lr-warmup-steps", help="Steps of linear warm-up (default: 5% of "
                                         "the steps a stage trains, at most 500; under --max-minutes, of those its "
                                         "time allows).")
    gradient_accumulation_steps: int = option(1, "--gradient-accumulation-steps", help="Micro-batches each step's "
                                              "--batch-size images are split into: less memory, the same steps.")
    validation_prompts: list[str] | None = option(None, "--validation-prompts", help="A prompt of the UNet's "
                                                  "sample grids (repeatable; default: the data set's first "
                                                  "captions).")
    resume_from_checkpoint: str | None = option(None, "--resume-from-checkpoint", help="Continue from this "
                                                "checkpoint (a step-N folder under OUT.runs/STAGE/checkpoints; "
                                                "later ones are replaced), or 'latest': the same as --resume.")
    vocab_size: int = option(DEFAULT_VOCAB_SIZE, "--vocab-size",
                             help="Upper bound of the tokenizer's vocabulary.")
    hard_negatives: float | None = option(
        None, "--hard-negatives", help="Share (0-1) of CLIP's images that also meet near misses of their caption, "
        "one per kind of change (\"a blue square below a red circle\" for one above it; NegCLIP), so that the text "
        "encoder keeps relations, shapes and counts apart. Shapes captions only. Default: 1 where the captions "
        "allow near misses, else 0.")
    prediction_type: str = option("v_prediction", "--prediction", help="UNet target: v_prediction or epsilon.")
    beta_schedule: str = option("scaled_linear", "--noise-schedule",
                                help="linear, scaled_linear or squaredcos_cap_v2.")
    zero_terminal_snr: bool | None = option(
        None, "--zero-terminal-snr/--no-zero-terminal-snr", help="Train up to pure noise (needs --prediction "
        "v_prediction), so that the layout comes from the caption, not from what the noise leaves of the image. "
        "Default: on with v_prediction.")
    snr_gamma: float = option(5.0, "--snr-gamma", help="Min-SNR loss weighting γ; 0 turns it off.")
    caption_dropout: float = option(0.1, "--caption-dropout", help="Share of empty captions (for guidance).")
    attention_loss: float = option(
        0.1, "--attention-loss", help="Weight of the loss that asks each object's words to attend inside its region "
        "(used where the data has object regions: shapes has them); 0 turns it off.")
    compile: bool = option(
        False, "--compile/--no-compile", help="Train the UNet stage through torch.compile (needs a C++ compiler): "
        "on a 2-core AVX2 CPU in fp32, 1.25x the images/s after a compile of about 4 minutes, so it pays for a "
        "UNet stage of 20 minutes and more. CLIP stays eager (its batches change shape), as does the VAE (0.88x).")
    init_unet: str | None = option(
        None, "--init", help="Start from this model's UNet weights (a model folder or a shipped name such as "
        "'shapes') instead of random ones: fine-tuning.")
    max_minutes: float | None = option(
        DEFAULT_RECIPE_MINUTES, "--max-minutes", help="Wall-clock budget of the whole command in minutes (default "
        f"{DEFAULT_RECIPE_MINUTES:g}; 0: none, train every step), split across the stages it trains (the whole "
        "recipe: CLIP 15%, VAE 20%, UNet 65%). "
        "A stage whose time is spent stops with a checkpoint, saved as if its steps were done; --resume goes on.")
    vae_crop: int | None = option(
        None, "--vae-crop", help="Side in pixels of the random square crops the VAE trains on (default: half the "
        "resolution; the resolution itself: whole images). A VAE is all convolutions and one attention, so it "
        "learns from crops and reconstructs whole images: a 32-pixel crop costs a quarter of a 64-pixel image. "
        "In 8 minutes on 2 CPU cores, crops of 32 reached 51% exact reconstructions of shapes, whole images 2%.")
    kl_weight: float = 1e-6        # the VAE's KL term
    reconstruction: str = "l1"     # the VAE's reconstruction loss

    def __post_init__(self):
        if self.zero_terminal_snr is None:
            self.zero_terminal_snr = self.prediction_type == "v_prediction"


@dataclasses.dataclass(kw_only=True)
class GanTrainConfig(SharedConfig):
    """The options of `brushwork train gan`."""

    text_model: Path | None = option(None, "--model", "-m", help="Model folder (or shipped name such as 'shapes') "
                                     "whose text_encoder/ and tokenizer/ condition the GAN.")
    size: str = option("small", "--size", help="GAN size: tiny (tests) or small (64×64, CPU, about an hour).")
    steps: int | None = option(None, "--steps", help="Optimizer steps, each one D step and one G step (default: "
                               "the size's).")
    lr: float = option(2e-4, "--lr", help="Learning rate of G (and of D, unless --lr-d).")
    lr_d: float | None = option(None, "--lr-d", help="D's learning rate (default: the same as --lr); DF-GAN trains "
                                "D 4x faster than G.")
    loss: str = option("hinge", "--loss", help=f"Adversarial loss: {', '.join(LOSSES)}.")
    r1_gamma: float = option(1.0, "--r1-gamma", help="Weight of the R1 gradient penalty on real images; 0 turns "
                             "it off.")
    r1_every: int = option(4, "--r1-every", help="Compute R1 on 1 in this many D steps (lazy), weighted up to "
                           "match.")
    clip_weight: float = option(0.0, "--clip-weight", help="Weight of a CLIP image-text similarity term in G's "
                                "loss (GALIP); uses MODEL's clip/. 0 turns it off.")
    clip_contrast: float = option(0.0, "--clip-contrast", help="Weight of a contrastive CLIP term in G's loss: "
                                  "each image must be nearer its own caption than every other caption of the data "
                                  "set (InfoNCE); uses MODEL's clip/. 0 turns it off.")
    mismatch_share: float = option(0.0, "--mismatch-share", help="Share (0-1) of D's mismatched captions that are "
                                   "near misses, one word changed (\"a blue circle\" for a blue square), instead of "
                                   "another image's caption, so that D checks shape as well as colour. Shapes "
                                   "captions only. 0: none.")
    near_miss_weight: float = option(0.0, "--near-miss-weight", help="Weight of a ranking term in G's loss: D must "
                                     "rate G's image higher with its own caption than with a near miss (one word "
                                     "changed). Shapes captions only. 0: none.")
    collapse_threshold: float = option(0.05, "--collapse-threshold", help="Stop when G's sample diversity (1.0 = "
                                       "as varied as real images) stays below this; 0 turns the watch off.")
    collapse_patience: int = option(5, "--collapse-patience", help="Consecutive log intervals below the "
                                    "threshold before stopping.")
    collapse_after: int = option(500, "--collapse-after", help="Steps before the collapse watch starts.")
    init: Path | None = option(None, "--init", help="Start G (its EMA weights) and D from this GAN run: a GAN "
                               "folder, its run folder (OUT.runs/gan) or one checkpoint folder (fine-tuning with new "
                               "settings; --resume continues a run unchanged).")
    log_every: int = 10


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
    """`value` as the field type `kind` (int, float, str, bool, Path or list[str], or one of them | None)."""
    allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None and type(None) in allowed:
        return None
    base = next(t for t in allowed if t is not type(None))
    if base is Path and isinstance(value, str):
        return Path(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(base) is list:  # list[str]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        raise BrushworkError(f"{where} must be a list of strings, got {value!r}.")
    if isinstance(value, base) and not (base is not bool and isinstance(value, bool)):
        return value
    raise BrushworkError(f"{where} must be {'a path' if base is Path else base.__name__}, got {value!r}.")


@dataclasses.dataclass(kw_only=True)
class DistillConfig(SharedConfig):
    """The options of `brushwork train distill`."""

    teacher: str | None = option(None, "--model", "-m", help="The teacher: a diffusion model folder, an SD file or a "
                                 "shipped name such as 'shapes'.")
    steps: int = option(2000, "--steps", help="Optimizer steps.")
    lr: float = option(1e-4, "--lr", help="Learning rate (constant after a short warmup).")
    w_min: float = option(2.0, "--w-min", help="Least guidance w the teacher is distilled at (w = guidance scale - "
                          "1: 2 is guidance 3); the student samples well at any w from --w-min to --w-max.")
    w_max: float = option(8.0, "--w-max", help="Greatest guidance w (8 is guidance 9).")
    solver_steps: int = option(50, "--solver-steps", help="The teacher's DDIM solver grid: each step skips "
                               "num_train_timesteps / this (20 of 1000 at 50); also the most sampling steps.")
    huber_c: float = option(0.001, "--huber-c", help="c of the Huber loss √(d² + c²) - c.")
    target_decay: float = option(0.95, "--target-decay", help="EMA decay of the target network (not of the saved "
                                 "weights: that is --ema-decay).")
