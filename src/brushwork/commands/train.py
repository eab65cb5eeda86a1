"""`brushwork train ...`: the whole recipe (tokenizer → CLIP → VAE → UNet), one stage of it, or a GAN; and `train
export`, which writes a UNet or distillation checkpoint of a run as a pipeline folder.

Every option is a field of RecipeConfig or GanTrainConfig, which holds its default, help text and flag
(train/options.py). Typer reads options from function signatures, so each command lists the options it takes,
one line each, and `cli_option` fills in the rest from the field: explicit, with no generated signatures.
"""

import dataclasses
import shlex
import time
from pathlib import Path

import typer
from rich.console import Console

from brushwork.train.options import STAGES, DistillConfig, GanTrainConfig, RecipeConfig, option_fields, read_config_file

app = typer.Typer(
    help="Train a text-to-image model on an image-caption data set: the whole recipe, or one stage "
    "(clip, vae, unet) into an existing model folder; a GAN; distil a diffusion model into a few-step one; or "
    "export a UNet or distillation checkpoint of a run as a model folder.",
    no_args_is_help=True,
    invoke_without_command=True,
)
console = Console()

STAGE_STEPS = "Steps of this stage (default: the size's)."


COMMAND_STARTED = "brushwork.command_started"   # ctx.meta key, set by the top-level command group (cli.py)


def command_started(ctx: typer.Context) -> float:
    """When the `brushwork` command started (time.time()): --max-minutes counts the whole command, the ~15 s of
    importing torch and diffusers on a slow CPU included."""
    return ctx.meta.get(COMMAND_STARTED, time.time())


def cli_option(config_class: type, name: str, *flags: str, help: str | None = None):
    """The Typer option of a config field: default, flags and help from the field (flags and help unless given)."""
    field = option_fields(config_class)[name]
    return typer.Option(field.default, *(flags or field.metadata["flags"]), help=help or field.metadata["help"])


def config_file_option():
    return typer.Option(None, "--config", help="A TOML (.toml) or YAML (.yaml) file of options keyed by their "
                        "Python names (batch_size = 32, mixed_precision = \"bf16\"); flags given here override it.")


def _config(ctx: typer.Context, config_class: type, config_file: Path | None, **renamed):
    """The command's config: the options of `config_file`, then `renamed` ones (deprecated flags), then those given
    on the command line; the rest keep the dataclass's defaults."""
    values = read_config_file(config_file, config_class) if config_file else {}
    names = option_fields(config_class)
    given = {name: value for name, value in ctx.params.items()
             if name in names and _on_command_line(ctx, name)}
    config = config_class(**(values | renamed | given))
    config.command = _command_line(ctx, config)
    return config


def _on_command_line(ctx: typer.Context, name: str) -> bool:
    # by name: newer Typer versions bring their own copy of click, with their own ParameterSource
    return ctx.get_parameter_source(name).name == "COMMANDLINE"


def _command_line(ctx: typer.Context, config) -> str:
    """The command that trains with `config` (a config file's options written out as flags): for the model card."""
    names, parent = [], ctx
    while parent.parent is not None:   # the subcommands under the root, however the root was run (python -m ...)
        names.insert(0, parent.info_name)
        parent = parent.parent
    words = ["brushwork", *names]
    names = option_fields(type(config))
    for param in ctx.command.params:
        if param.name not in names:
            continue  # --config, deprecated flags
        value = getattr(config, param.name)
        default = getattr(dataclasses.replace(config, **{param.name: param.default}), param.name)  # None resolved
        if value != default and value != []:
            values = value if isinstance(value, list) else [value]
            if param.is_flag:
                words.append(param.opts[0] if value or not param.secondary_opts else param.secondary_opts[0])
            else:
                words += [w for v in values for w in (param.opts[0], f"{v:g}" if isinstance(v, float) else str(v))]
    return shlex.join(words)


def _train_recipe(ctx: typer.Context, stages: tuple[str, ...], config_file: Path | None) -> None:
    from brushwork.generation.loading import quiet_libraries
    from brushwork.train.recipe import train as train_recipe  # torch and diffusers: only when training

    quiet_libraries()

    folder = train_recipe(_config(ctx, RecipeConfig, config_file), stages, command_started(ctx))
    console.print(f"trained {', '.join(stages)} into {folder}")


@app.callback()
def recipe(
    ctx: typer.Context,
    config_file: Path | None = config_file_option(),
    data: str | None = cli_option(RecipeConfig, "data"),
    split: str | None = cli_option(RecipeConfig, "split"),
    image_column: str | None = cli_option(RecipeConfig, "image_column"),
    caption_column: str | None = cli_option(RecipeConfig, "caption_column"),
    out: Path | None = cli_option(RecipeConfig, "out"),
    size: str = cli_option(RecipeConfig, "size"),
    steps_clip: int | None = cli_option(RecipeConfig, "steps_clip"),
    steps_vae: int | None = cli_option(RecipeConfig, "steps_vae"),
    steps_unet: int | None = cli_option(RecipeConfig, "steps_unet"),
    batch_size: int | None = cli_option(RecipeConfig, "batch_size"),
    n: int | None = cli_option(RecipeConfig, "n"),
    resolution: int | None = cli_option(RecipeConfig, "resolution"),
    work: Path | None = cli_option(RecipeConfig, "work"),
    resume: bool = cli_option(RecipeConfig, "resume"),
    seed: int = cli_option(RecipeConfig, "seed"),
    mixed_precision: str = cli_option(RecipeConfig, "mixed_precision"),
    compile: bool = cli_option(RecipeConfig, "compile"),
    prediction_type: str = cli_option(RecipeConfig, "prediction_type"),
    beta_schedule: str = cli_option(RecipeConfig, "beta_schedule"),
    zero_terminal_snr: bool | None = cli_option(RecipeConfig, "zero_terminal_snr"),
    snr_gamma: float = cli_option(RecipeConfig, "snr_gamma"),
    caption_dropout: float = cli_option(RecipeConfig, "caption_dropout"),
    attention_loss: float = cli_option(RecipeConfig, "attention_loss"),
    vae_crop: int | None = cli_option(RecipeConfig, "vae_crop"),
    ema_decay: float = cli_option(RecipeConfig, "ema_decay"),
    vocab_size: int = cli_option(RecipeConfig, "vocab_size"),
    checkpoint_every: int = cli_option(RecipeConfig, "checkpoint_every"),
    sample_every: int = cli_option(RecipeConfig, "sample_every"),
    num_workers: int = cli_option(RecipeConfig, "num_workers"),
    max_minutes: float | None = cli_option(RecipeConfig, "max_minutes"),
    report_to: str = cli_option(RecipeConfig, "report_to"),
    hard_negatives: float = cli_option(RecipeConfig, "hard_negatives"),
    lr: float | None = cli_option(RecipeConfig, "lr"),
    lr_scheduler: str = cli_option(RecipeConfig, "lr_scheduler"),
    lr_warmup_steps: int | None = cli_option(RecipeConfig, "lr_warmup_steps"),
    gradient_accumulation_steps: int = cli_option(RecipeConfig, "gradient_accumulation_steps"),
    resume_from_checkpoint: str | None = cli_option(RecipeConfig, "resume_from_checkpoint"),
    validation_prompts: list[str] | None = cli_option(RecipeConfig, "validation_prompts"),
) -> None:
    """Train the whole recipe: tokenizer, CLIP, VAE, UNet, into one diffusers pipeline folder."""
    if ctx.invoked_subcommand is None:
        _train_recipe(ctx, STAGES, config_file)


@app.command()
def clip(
    ctx: typer.Context,
    config_file: Path | None = config_file_option(),
    data: str | None = cli_option(RecipeConfig, "data"),
    split: str | None = cli_option(RecipeConfig, "split"),
    image_column: str | None = cli_option(RecipeConfig, "image_column"),
    caption_column: str | None = cli_option(RecipeConfig, "caption_column"),
    out: Path | None = cli_option(RecipeConfig, "out"),
    size: str = cli_option(RecipeConfig, "size"),
    steps_clip: int | None = cli_option(RecipeConfig, "steps_clip", "--steps", help=STAGE_STEPS),
    batch_size: int | None = cli_option(RecipeConfig, "batch_size"),
    n: int | None = cli_option(RecipeConfig, "n"),
    resolution: int | None = cli_option(RecipeConfig, "resolution"),
    work: Path | None = cli_option(RecipeConfig, "work"),
    resume: bool = cli_option(RecipeConfig, "resume"),
    seed: int = cli_option(RecipeConfig, "seed"),
    mixed_precision: str = cli_option(RecipeConfig, "mixed_precision"),
    compile: bool = cli_option(RecipeConfig, "compile"),
    vocab_size: int = cli_option(RecipeConfig, "vocab_size"),
    checkpoint_every: int = cli_option(RecipeConfig, "checkpoint_every"),
    sample_every: int = cli_option(RecipeConfig, "sample_every"),
    num_workers: int = cli_option(RecipeConfig, "num_workers"),
    max_minutes: float | None = cli_option(RecipeConfig, "max_minutes"),
    report_to: str = cli_option(RecipeConfig, "report_to"),
    hard_negatives: float = cli_option(RecipeConfig, "hard_negatives"),
    lr: float | None = cli_option(RecipeConfig, "lr"),
    lr_scheduler: str = cli_option(RecipeConfig, "lr_scheduler"),
    lr_warmup_steps: int | None = cli_option(RecipeConfig, "lr_warmup_steps"),
    gradient_accumulation_steps: int = cli_option(RecipeConfig, "gradient_accumulation_steps"),
    resume_from_checkpoint: str | None = cli_option(RecipeConfig, "resume_from_checkpoint"),
) -> None:
    """Train the tokenizer and CLIP: writes tokenizer/, text_encoder/ and clip/ into OUT."""
    _train_recipe(ctx, ("clip",), config_file)


@app.command()
def vae(
    ctx: typer.Context,
    config_file: Path | None = config_file_option(),
    data: str | None = cli_option(RecipeConfig, "data"),
    split: str | None = cli_option(RecipeConfig, "split"),
    image_column: str | None = cli_option(RecipeConfig, "image_column"),
    caption_column: str | None = cli_option(RecipeConfig, "caption_column"),
    out: Path | None = cli_option(RecipeConfig, "out"),
    size: str = cli_option(RecipeConfig, "size"),
    steps_vae: int | None = cli_option(RecipeConfig, "steps_vae", "--steps", help=STAGE_STEPS),
    vae_crop: int | None = cli_option(RecipeConfig, "vae_crop"),
    batch_size: int | None = cli_option(RecipeConfig, "batch_size"),
    n: int | None = cli_option(RecipeConfig, "n"),
    resolution: int | None = cli_option(RecipeConfig, "resolution"),
    work: Path | None = cli_option(RecipeConfig, "work"),
    resume: bool = cli_option(RecipeConfig, "resume"),
    seed: int = cli_option(RecipeConfig, "seed"),
    mixed_precision: str = cli_option(RecipeConfig, "mixed_precision"),
    checkpoint_every: int = cli_option(RecipeConfig, "checkpoint_every"),
    sample_every: int = cli_option(RecipeConfig, "sample_every"),
    num_workers: int = cli_option(RecipeConfig, "num_workers"),
    max_minutes: float | None = cli_option(RecipeConfig, "max_minutes"),
    report_to: str = cli_option(RecipeConfig, "report_to"),
    lr: float | None = cli_option(RecipeConfig, "lr"),
    lr_scheduler: str = cli_option(RecipeConfig, "lr_scheduler"),
    lr_warmup_steps: int | None = cli_option(RecipeConfig, "lr_warmup_steps"),
    gradient_accumulation_steps: int = cli_option(RecipeConfig, "gradient_accumulation_steps"),
    resume_from_checkpoint: str | None = cli_option(RecipeConfig, "resume_from_checkpoint"),
) -> None:
    """Train the VAE and measure its latent scale: writes vae/ into OUT."""
    _train_recipe(ctx, ("vae",), config_file)


@app.command()
def unet(
    ctx: typer.Context,
    config_file: Path | None = config_file_option(),
    data: str | None = cli_option(RecipeConfig, "data"),
    split: str | None = cli_option(RecipeConfig, "split"),
    image_column: str | None = cli_option(RecipeConfig, "image_column"),
    caption_column: str | None = cli_option(RecipeConfig, "caption_column"),
    out: Path | None = cli_option(RecipeConfig, "out"),
    size: str = cli_option(RecipeConfig, "size"),
    steps_unet: int | None = cli_option(RecipeConfig, "steps_unet", "--steps", help=STAGE_STEPS),
    batch_size: int | None = cli_option(RecipeConfig, "batch_size"),
    n: int | None = cli_option(RecipeConfig, "n"),
    resolution: int | None = cli_option(RecipeConfig, "resolution"),
    work: Path | None = cli_option(RecipeConfig, "work"),
    resume: bool = cli_option(RecipeConfig, "resume"),
    seed: int = cli_option(RecipeConfig, "seed"),
    mixed_precision: str = cli_option(RecipeConfig, "mixed_precision"),
    compile: bool = cli_option(RecipeConfig, "compile"),
    prediction_type: str = cli_option(RecipeConfig, "prediction_type"),
    beta_schedule: str = cli_option(RecipeConfig, "beta_schedule"),
    zero_terminal_snr: bool | None = cli_option(RecipeConfig, "zero_terminal_snr"),
    snr_gamma: float = cli_option(RecipeConfig, "snr_gamma"),
    caption_dropout: float = cli_option(RecipeConfig, "caption_dropout"),
    attention_loss: float = cli_option(RecipeConfig, "attention_loss"),
    ema_decay: float = cli_option(RecipeConfig, "ema_decay"),
    checkpoint_every: int = cli_option(RecipeConfig, "checkpoint_every"),
    sample_every: int = cli_option(RecipeConfig, "sample_every"),
    num_workers: int = cli_option(RecipeConfig, "num_workers"),
    init_unet: str | None = cli_option(RecipeConfig, "init_unet"),
    max_minutes: float | None = cli_option(RecipeConfig, "max_minutes"),
    report_to: str = cli_option(RecipeConfig, "report_to"),
    lr: float | None = cli_option(RecipeConfig, "lr"),
    lr_scheduler: str = cli_option(RecipeConfig, "lr_scheduler"),
    lr_warmup_steps: int | None = cli_option(RecipeConfig, "lr_warmup_steps"),
    gradient_accumulation_steps: int = cli_option(RecipeConfig, "gradient_accumulation_steps"),
    resume_from_checkpoint: str | None = cli_option(RecipeConfig, "resume_from_checkpoint"),
    validation_prompts: list[str] | None = cli_option(RecipeConfig, "validation_prompts"),
) -> None:
    """Train the UNet on OUT's text encoder and VAE: writes unet/, scheduler/ and model_index.json."""
    _train_recipe(ctx, ("unet",), config_file)


@app.command()
def gan(
    ctx: typer.Context,
    config_file: Path | None = config_file_option(),
    data: str | None = cli_option(GanTrainConfig, "data"),
    split: str | None = cli_option(GanTrainConfig, "split"),
    image_column: str | None = cli_option(GanTrainConfig, "image_column"),
    caption_column: str | None = cli_option(GanTrainConfig, "caption_column"),
    text_model: Path | None = cli_option(GanTrainConfig, "text_model"),
    out: Path | None = cli_option(GanTrainConfig, "out"),
    size: str = cli_option(GanTrainConfig, "size"),
    steps: int | None = cli_option(GanTrainConfig, "steps"),
    batch_size: int | None = cli_option(GanTrainConfig, "batch_size"),
    n: int | None = cli_option(GanTrainConfig, "n"),
    lr: float = cli_option(GanTrainConfig, "lr"),
    lr_d: float | None = cli_option(GanTrainConfig, "lr_d"),
    loss: str = cli_option(GanTrainConfig, "loss"),
    r1_gamma: float = cli_option(GanTrainConfig, "r1_gamma"),
    r1_every: int = cli_option(GanTrainConfig, "r1_every"),
    clip_weight: float = cli_option(GanTrainConfig, "clip_weight"),
    clip_contrast: float = cli_option(GanTrainConfig, "clip_contrast"),
    mismatch_share: float = cli_option(GanTrainConfig, "mismatch_share"),
    near_miss_weight: float = cli_option(GanTrainConfig, "near_miss_weight"),
    ema_decay: float = cli_option(GanTrainConfig, "ema_decay"),
    collapse_threshold: float = cli_option(GanTrainConfig, "collapse_threshold"),
    collapse_patience: int = cli_option(GanTrainConfig, "collapse_patience"),
    collapse_after: int = cli_option(GanTrainConfig, "collapse_after"),
    work: Path | None = cli_option(GanTrainConfig, "work"),
    resume: bool = cli_option(GanTrainConfig, "resume"),
    seed: int = cli_option(GanTrainConfig, "seed"),
    mixed_precision: str = cli_option(GanTrainConfig, "mixed_precision"),
    checkpoint_every: int = cli_option(GanTrainConfig, "checkpoint_every"),
    sample_every: int = cli_option(GanTrainConfig, "sample_every"),
    num_workers: int = cli_option(GanTrainConfig, "num_workers"),
    max_minutes: float | None = cli_option(GanTrainConfig, "max_minutes"),
    report_to: str = cli_option(GanTrainConfig, "report_to"),
    init: Path | None = cli_option(GanTrainConfig, "init"),
    hard_negatives: float | None = typer.Option(None, "--hard-negatives", hidden=True),  # --mismatch-share's old name
) -> None:
    """Train a one-step text-conditional GAN on MODEL's frozen text encoder: writes a GAN folder to OUT."""
    renamed = {}
    if hard_negatives is not None:
        typer.echo("Warning: `train gan --hard-negatives` is now --mismatch-share (D's share of near-miss captions); "
                   "the old name will go.", err=True)
        renamed["mismatch_share"] = hard_negatives
    from brushwork.generation.loading import quiet_libraries
    from brushwork.train.gan import train_gan

    quiet_libraries()

    folder = train_gan(_config(ctx, GanTrainConfig, config_file, **renamed), command_started(ctx))
    console.print(f"trained a GAN into {folder}")


@app.command()
def distill(
    ctx: typer.Context,
    config_file: Path | None = config_file_option(),
    teacher: str | None = cli_option(DistillConfig, "teacher"),
    out: Path | None = cli_option(DistillConfig, "out"),
    data: str | None = cli_option(DistillConfig, "data", help="Data whose images are noised for the teacher "
                                  "(default: the teacher's, from its training.json)."),
    split: str | None = cli_option(DistillConfig, "split"),
    image_column: str | None = cli_option(DistillConfig, "image_column"),
    caption_column: str | None = cli_option(DistillConfig, "caption_column"),
    n: int | None = cli_option(DistillConfig, "n", help="Use this many items (default: the teacher's n with its "
                               "data, else the data set's)."),
    steps: int = cli_option(DistillConfig, "steps"),
    batch_size: int | None = cli_option(DistillConfig, "batch_size", help="Images per step (default 32)."),
    lr: float = cli_option(DistillConfig, "lr"),
    w_min: float = cli_option(DistillConfig, "w_min"),
    w_max: float = cli_option(DistillConfig, "w_max"),
    solver_steps: int = cli_option(DistillConfig, "solver_steps"),
    huber_c: float = cli_option(DistillConfig, "huber_c"),
    target_decay: float = cli_option(DistillConfig, "target_decay"),
    ema_decay: float = cli_option(DistillConfig, "ema_decay"),
    work: Path | None = cli_option(DistillConfig, "work"),
    resume: bool = cli_option(DistillConfig, "resume"),
    seed: int = cli_option(DistillConfig, "seed"),
    mixed_precision: str = cli_option(DistillConfig, "mixed_precision"),
    checkpoint_every: int = cli_option(DistillConfig, "checkpoint_every"),
    sample_every: int = cli_option(DistillConfig, "sample_every"),
    num_workers: int = cli_option(DistillConfig, "num_workers"),
    max_minutes: float | None = cli_option(DistillConfig, "max_minutes"),
    report_to: str = cli_option(DistillConfig, "report_to"),
) -> None:
    """Distil a diffusion model (the teacher) into a few-step one by latent consistency distillation: writes a
    LatentConsistencyModelPipeline folder to OUT (brushwork generate --model OUT --steps 4)."""
    from brushwork.generation.loading import quiet_libraries
    from brushwork.train.distill import train_distill

    quiet_libraries()

    folder = train_distill(_config(ctx, DistillConfig, config_file), command_started(ctx))
    console.print(f"distilled {ctx.params['teacher']} into {folder}")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A step-N folder under MODEL.runs/unet/checkpoints or "
                                      "MODEL.runs/distill/checkpoints."),
    out: Path = typer.Option(..., "--out", help="The pipeline folder to write (new or empty)."),
    model: Path | None = typer.Option(None, "--model", help="The folder the UNet trains in, or a distillation's "
                                      "teacher, for the text encoder, tokenizer and VAE (default: MODEL of "
                                      "MODEL.runs)."),
    raw: bool = typer.Option(False, "--raw", help="The trained weights instead of their EMA (what a run writes "
                             "when it ends)."),
) -> None:
    """Write a UNet or distillation checkpoint of a run, finished or not, as a pipeline folder that generate, eval
    and serve take."""
    from brushwork.generation.loading import quiet_libraries
    from brushwork.train.recipe import export_checkpoint

    quiet_libraries()

    folder = export_checkpoint(checkpoint, out, model, ema=not raw)
    console.print(f"wrote {folder}")
