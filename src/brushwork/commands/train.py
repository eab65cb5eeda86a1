"""`brushwork train ...`: the whole recipe (tokenizer → CLIP → VAE → UNet), or one stage of it."""

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from brushwork.errors import BrushworkError
from brushwork.train.gan import LOSSES as GAN_LOSSES, GanTrainConfig, train_gan
from brushwork.train.recipe import STAGES, RecipeConfig, train as train_recipe

app = typer.Typer(
    help="Train a text-to-image model on an image-caption data set: the whole recipe, or one stage "
    "(clip, vae, unet) into an existing model folder.",
    no_args_is_help=True,
    invoke_without_command=True,
)
console = Console()

Data = Annotated[str | None, typer.Option("--data", "-d", help="'shapes', 'emoji', or a data set folder / .tar.")]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Model folder to write (diffusers layout).")]
Size = Annotated[str, typer.Option(help="Model size: tiny (tests), compact (small with fewer layers), small (CPU, hours), base (GPU).")]
StepsClip = Annotated[int | None, typer.Option("--steps-clip", help="CLIP steps (default: the size's).")]
StepsVae = Annotated[int | None, typer.Option("--steps-vae", help="VAE steps (default: the size's).")]
StepsUnet = Annotated[int | None, typer.Option("--steps-unet", help="UNet steps (default: the size's).")]
InitUnet = Annotated[str | None, typer.Option("--init", help="Start from this model's UNet weights (a model folder or a shipped name such as 'shapes') instead of random ones: fine-tuning.")]
UnetLr = Annotated[float | None, typer.Option("--lr", help="Peak learning rate (default 5e-4; lower suits --init).")]
Steps = Annotated[int | None, typer.Option("--steps", help="Steps of this stage (default: the size's).")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", help="Images per step (default: the size's).")]
Count = Annotated[int | None, typer.Option("--n", help="Use this many items (shapes: images to draw; default 100000).")]
Resolution = Annotated[int | None, typer.Option(help="Image side in pixels (default: the size's, 64).")]
Work = Annotated[Path | None, typer.Option(help="Folder for checkpoints, logs and samples (default: OUT/runs).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted training in OUT.")]
Seed = Annotated[int, typer.Option(help="Seed of the data and of training.")]
Precision = Annotated[str, typer.Option("--precision", help="Mixed precision: auto, no, bf16, fp16.")]
Prediction = Annotated[str, typer.Option("--prediction", help="UNet target: epsilon or v_prediction.")]
Schedule = Annotated[str, typer.Option("--noise-schedule", help="linear, scaled_linear or squaredcos_cap_v2.")]
SnrGamma = Annotated[float, typer.Option("--snr-gamma", help="Min-SNR loss weighting γ; 0 turns it off.")]
CaptionDropout = Annotated[float, typer.Option("--caption-dropout", help="Share of empty captions (for guidance).")]
EmaDecay = Annotated[float, typer.Option("--ema-decay", help="EMA decay of the generator's weights (UNet or GAN G); 0 turns it off.")]
VocabSize = Annotated[int, typer.Option("--vocab-size", help="Upper bound of the tokenizer's vocabulary.")]
CheckpointEvery = Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")]
SampleEvery = Annotated[int, typer.Option("--sample-every", help="Steps between sample grids; 0: never.")]
Workers = Annotated[int, typer.Option("--workers", help="Data loader worker processes.")]
ClipHardNegatives = Annotated[float, typer.Option("--hard-negatives", help="Share (0-1) of CLIP's images that also meet near misses of their caption, one per kind of change (\"a blue square below a red circle\" for one above it; NegCLIP), so that the text encoder keeps relations, shapes and counts apart. Shapes captions only. 0: none.")]
MaxMinutes = Annotated[float | None, typer.Option("--max-minutes", help="Stop each stage after this many minutes of training, saved as if its steps were done; --resume goes on.")]


def _command_line(ctx: typer.Context) -> str:
    """The command as typed, up to option order: for the model card."""
    words = ["brushwork", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.param_type_name == "option" and value is not None and value != param.default:
            words += [param.opts[0]] if param.is_flag else [param.opts[0], str(value)]
    return shlex.join(words)


def _run(ctx: typer.Context, stages: tuple[str, ...], data: str | None, out: Path | None, size: str,
         steps_clip: int | None, steps_vae: int | None, steps_unet: int | None, batch_size: int | None, n: int | None,
         resolution: int | None, work: Path | None, resume: bool, seed: int, precision: str, prediction: str,
         noise_schedule: str, snr_gamma: float, caption_dropout: float, ema_decay: float, vocab_size: int,
         checkpoint_every: int, sample_every: int, workers: int, max_minutes: float | None,
         init_unet: str | None = None, lr: float | None = None, hard_negatives: float = 0.0) -> None:
    if data is None or out is None:
        raise BrushworkError("--data and --out are required, e.g. brushwork train --data shapes --out my-model")
    config = RecipeConfig(
        data=data, out=out, size=size, steps={"clip": steps_clip, "vae": steps_vae, "unet": steps_unet},
        batch_size=batch_size, n=n, resolution=resolution, work=work, resume=resume, seed=seed,
        mixed_precision=precision, prediction_type=prediction, beta_schedule=noise_schedule,
        snr_gamma=snr_gamma or None, caption_dropout=caption_dropout, ema_decay=ema_decay or None,
        vocab_size=vocab_size, checkpoint_every=checkpoint_every, sample_every=sample_every, num_workers=workers,
        init_unet=init_unet, max_minutes=max_minutes, hard_negatives=hard_negatives, command=_command_line(ctx),
    )
    if lr is not None:
        if not lr > 0:
            raise BrushworkError(f"--lr must be a positive number, got {lr}.")
        config.lr = config.lr | {stage: lr for stage in stages}
    folder = train_recipe(config, stages)
    console.print(f"trained {', '.join(stages)} into {folder}")


@app.callback()
def recipe(
    ctx: typer.Context,
    data: Data = None, out: Out = None, size: Size = "small", steps_clip: StepsClip = None,
    steps_vae: StepsVae = None, steps_unet: StepsUnet = None, batch_size: BatchSize = None, n: Count = None,
    resolution: Resolution = None, work: Work = None, resume: Resume = False, seed: Seed = 0,
    precision: Precision = "auto", prediction: Prediction = "epsilon", noise_schedule: Schedule = "scaled_linear",
    snr_gamma: SnrGamma = 5.0, caption_dropout: CaptionDropout = 0.1, ema_decay: EmaDecay = 0.999,
    vocab_size: VocabSize = 4096, checkpoint_every: CheckpointEvery = 500, sample_every: SampleEvery = 500,
    workers: Workers = 0, max_minutes: MaxMinutes = None, hard_negatives: ClipHardNegatives = 0.0,
) -> None:
    """Train the whole recipe: tokenizer, CLIP, VAE, UNet, into one diffusers pipeline folder."""
    if ctx.invoked_subcommand is not None:
        return
    _run(ctx, STAGES, data, out, size, steps_clip, steps_vae, steps_unet, batch_size, n, resolution, work, resume, seed,
         precision, prediction, noise_schedule, snr_gamma, caption_dropout, ema_decay, vocab_size,
         checkpoint_every, sample_every, workers, max_minutes, hard_negatives=hard_negatives)


@app.command()
def clip(
    ctx: typer.Context, data: Data = None, out: Out = None, size: Size = "small", steps: Steps = None,
    batch_size: BatchSize = None,
    n: Count = None, resolution: Resolution = None, work: Work = None, resume: Resume = False, seed: Seed = 0,
    precision: Precision = "auto", vocab_size: VocabSize = 4096, checkpoint_every: CheckpointEvery = 500,
    sample_every: SampleEvery = 500, workers: Workers = 0, max_minutes: MaxMinutes = None,
    hard_negatives: ClipHardNegatives = 0.0,
) -> None:
    """Train the tokenizer and CLIP: writes tokenizer/, text_encoder/ and clip/ into OUT."""
    _run(ctx, ("clip",), data, out, size, steps, None, None, batch_size, n, resolution, work, resume, seed, precision,
         "epsilon", "scaled_linear", 5.0, 0.1, 0.999, vocab_size, checkpoint_every, sample_every, workers,
         max_minutes, hard_negatives=hard_negatives)


@app.command()
def vae(
    ctx: typer.Context, data: Data = None, out: Out = None, size: Size = "small", steps: Steps = None,
    batch_size: BatchSize = None,
    n: Count = None, resolution: Resolution = None, work: Work = None, resume: Resume = False, seed: Seed = 0,
    precision: Precision = "auto", checkpoint_every: CheckpointEvery = 500, sample_every: SampleEvery = 500,
    workers: Workers = 0, max_minutes: MaxMinutes = None,
) -> None:
    """Train the VAE and measure its latent scale: writes vae/ into OUT."""
    _run(ctx, ("vae",), data, out, size, None, steps, None, batch_size, n, resolution, work, resume, seed, precision,
         "epsilon", "scaled_linear", 5.0, 0.1, 0.999, 4096, checkpoint_every, sample_every, workers, max_minutes)


@app.command()
def unet(
    ctx: typer.Context, data: Data = None, out: Out = None, size: Size = "small", steps: Steps = None,
    batch_size: BatchSize = None,
    n: Count = None, resolution: Resolution = None, work: Work = None, resume: Resume = False, seed: Seed = 0,
    precision: Precision = "auto", prediction: Prediction = "epsilon", noise_schedule: Schedule = "scaled_linear",
    snr_gamma: SnrGamma = 5.0, caption_dropout: CaptionDropout = 0.1, ema_decay: EmaDecay = 0.999,
    checkpoint_every: CheckpointEvery = 500, sample_every: SampleEvery = 500, workers: Workers = 0,
    init: InitUnet = None, lr: UnetLr = None, max_minutes: MaxMinutes = None,
) -> None:
    """Train the UNet on OUT's text encoder and VAE: writes unet/, scheduler/ and model_index.json."""
    _run(ctx, ("unet",), data, out, size, None, None, steps, batch_size, n, resolution, work, resume, seed, precision,
         prediction, noise_schedule, snr_gamma, caption_dropout, ema_decay, 4096, checkpoint_every, sample_every,
         workers, max_minutes, init_unet=init, lr=lr)


TextModel = Annotated[Path | None, typer.Option("--model", "-m", help="Model folder (or shipped name such as 'shapes') whose text_encoder/ and tokenizer/ condition the GAN.")]
GanSize = Annotated[str, typer.Option(help="GAN size: tiny (tests) or small (64×64, CPU, about an hour).")]
GanSteps = Annotated[int | None, typer.Option("--steps", help="Optimizer steps, each one D step and one G step (default: the size's).")]
GanLoss = Annotated[str, typer.Option("--loss", help=f"Adversarial loss: {', '.join(GAN_LOSSES)}.")]
GanLr = Annotated[float, typer.Option("--lr", help="Learning rate of G (and of D, unless --lr-d).")]
R1Gamma = Annotated[float, typer.Option("--r1-gamma", help="Weight of the R1 gradient penalty on real images; 0 turns it off.")]
R1Every = Annotated[int, typer.Option("--r1-every", help="Compute R1 on 1 in this many D steps (lazy), weighted up to match.")]
ClipWeight = Annotated[float, typer.Option("--clip-weight", help="Weight of a CLIP image-text similarity term in G's loss (GALIP); uses MODEL's clip/. 0 turns it off.")]
ClipContrast = Annotated[float, typer.Option("--clip-contrast", help="Weight of a contrastive CLIP term in G's loss: each image must be nearer its own caption than every other caption of the data set (InfoNCE); uses MODEL's clip/. 0 turns it off.")]
HardNegatives = Annotated[float, typer.Option("--hard-negatives", help="Share (0-1) of D's mismatched captions that are near misses, one word changed (\"a blue circle\" for a blue square), instead of another image's caption, so that D checks shape as well as colour. Shapes captions only. 0: none.")]
NearMissWeight = Annotated[float, typer.Option("--near-miss-weight", help="Weight of a ranking term in G's loss: D must rate G's image higher with its own caption than with a near miss (one word changed). Shapes captions only. 0: none.")]
PatchWeight = Annotated[float, typer.Option("--patch-weight", help="Weight of a patch discriminator (pix2pix's PatchGAN: real/fake per 20x20 px patch, no caption) in D's and G's losses: a local signal for crisp edges and corners. 0: none.")]
CollapseThreshold = Annotated[float, typer.Option("--collapse-threshold", help="Stop when G's sample diversity (1.0 = as varied as real images) stays below this; 0 turns the watch off.")]
CollapsePatience = Annotated[int, typer.Option("--collapse-patience", help="Consecutive log intervals below the threshold before stopping.")]
UncondWeight = Annotated[float, typer.Option("--uncond-weight", help="Weight of D's and G's real/fake terms with the caption withheld (StackGAN++/AttnGAN's joint loss): D must learn what real images look like, not only whether they match their captions. 0 turns them off.")]
ReconWeight = Annotated[float, typer.Option("--recon-weight", help="Weight of G's L1 rebuilding of real images from an encoder's z (BicycleGAN's cVAE-GAN): a direct pixel signal that teaches crisp objects and places them by z. 0: no encoder.")]
KlWeight = Annotated[float, typer.Option("--kl-weight", help="Weight of the KL term keeping the encoder's z near N(0, I) (with --recon-weight).")]
GanLrD = Annotated[float | None, typer.Option("--lr-d", help="D's learning rate (default: the same as --lr); DF-GAN trains D 4x faster than G.")]
GanInit = Annotated[Path | None, typer.Option("--init", help="Start G (its EMA weights) and D from this GAN run: a GAN folder, its runs/gan/ or one checkpoint folder (fine-tuning with new settings; --resume continues a run unchanged).")]
CollapseAfter = Annotated[int, typer.Option("--collapse-after", help="Steps before the collapse watch starts.")]


@app.command()
def gan(
    ctx: typer.Context, data: Data = None, model: TextModel = None, out: Out = None, size: GanSize = "small",
    steps: GanSteps = None, batch_size: BatchSize = None, n: Count = None, lr: GanLr = 2e-4, lr_d: GanLrD = None, loss: GanLoss = "hinge",
    r1_gamma: R1Gamma = 1.0, r1_every: R1Every = 4, clip_weight: ClipWeight = 0.0, clip_contrast: ClipContrast = 0.0, patch_weight: PatchWeight = 0.0, hard_negatives: HardNegatives = 0.0, near_miss_weight: NearMissWeight = 0.0,
    uncond_weight: UncondWeight = 0.0,
    recon_weight: ReconWeight = 0.0, kl_weight: KlWeight = 0.01, ema_decay: EmaDecay = 0.999,
    collapse_threshold: CollapseThreshold = 0.05, collapse_patience: CollapsePatience = 5,
    collapse_after: CollapseAfter = 500, work: Work = None, resume: Resume = False, seed: Seed = 0,
    precision: Precision = "auto", checkpoint_every: CheckpointEvery = 500, sample_every: SampleEvery = 500,
    workers: Workers = 0, max_minutes: MaxMinutes = None, init: GanInit = None,
) -> None:
    """Train a one-step text-conditional GAN on MODEL's frozen text encoder: writes a GAN folder to OUT."""
    if data is None or model is None or out is None:
        raise BrushworkError("--data, --model and --out are required, e.g. brushwork train gan --data shapes "
                             "--model my-model --out my-gan")
    config = GanTrainConfig(
        data=data, text_model=model, out=out, size=size, steps=steps, batch_size=batch_size, n=n, lr=lr, lr_d=lr_d, loss=loss,
        r1_gamma=r1_gamma, r1_every=r1_every, clip_weight=clip_weight, clip_contrast=clip_contrast, patch_weight=patch_weight, hard_negatives=hard_negatives, near_miss_weight=near_miss_weight,
        uncond_weight=uncond_weight,
        recon_weight=recon_weight, kl_weight=kl_weight, ema_decay=ema_decay or None,
        collapse_threshold=collapse_threshold, collapse_patience=collapse_patience, collapse_after=collapse_after, work=work, resume=resume, seed=seed,
        mixed_precision=precision, checkpoint_every=checkpoint_every, sample_every=sample_every, num_workers=workers,
        max_minutes=max_minutes, init=init, command=_command_line(ctx),
    )
    folder = train_gan(config)
    console.print(f"trained a GAN into {folder}")
