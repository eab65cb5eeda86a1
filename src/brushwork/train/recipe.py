"""The whole training recipe: tokenizer → CLIP → VAE → UNet → one diffusers pipeline folder.

MODEL/ (what `brushwork train` writes; loads with diffusers.StableDiffusionPipeline.from_pretrained):
    model_index.json  unet/ (EMA weights)  vae/  text_encoder/  tokenizer/  scheduler/   diffusers-standard
    clip/        the full CLIPModel (text + vision towers), with a CLIPProcessor config, for evaluation
                 (brushwork.models.clip.load_clip also reads a clip/ holding only the vision tower)
    README.md    model card; training.json holds the same facts as data
OUT.runs/<stage>/  checkpoints, log.jsonl, samples/ of each stage, beside MODEL (or under --work)

Each stage writes its part of MODEL as soon as it ends, so `train clip`, `train vae` and `train unet` can
run one at a time; `train unet` reads text_encoder/, tokenizer/ and vae/ from MODEL.
"""

import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, load_model
from transformers import CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPTokenizer

from brushwork.data.captions import has_near_misses, require_near_misses
from brushwork.data.dataset import DataOptions, data_facts, open_dataset, report_lines
from brushwork.data.transforms import to_image
from brushwork.errors import BrushworkError
from brushwork.eval.checker import check
from brushwork.generation.registry import resolve_model
from brushwork.hardware import require_cpp_compiler
from brushwork.models.sizes import ModelSize, build_clip, build_unet, build_vae, count_parameters, get_size
from brushwork.tokenizer import train_tokenizer
from brushwork.train.loop import (LR_SCHEDULES, TrainConfig, check_report_to, check_writable, checkpoint_problem,
                                  list_checkpoints, process_state, run)
from brushwork.train.options import STAGES, RecipeConfig, runs_folder
from brushwork.train.stages import (ClipStage, UnetStage, VaeStage, inference_scheduler, lcm_scheduler, noise_schedule,
                                    normalize_latents, text_encoder_from_clip)

# Settings that change what a stage trains on or how: a resumed run must use the same ones.
RESUME_KEYS = {"common": ("data", "split", "image_column", "caption_column", "n", "size", "resolution", "seed"),
               "clip": ("vocab_size", "hard_negatives"),
               "vae": ("kl_weight", "reconstruction", "vae_crop"),
               "unet": ("prediction_type", "beta_schedule", "zero_terminal_snr", "snr_gamma", "caption_dropout")}


# The share of a --max-minutes budget each stage trains for (of the stages the command runs), and the least
# training a stage may get: a budget that leaves any stage less is refused before work starts.
BUDGET_SHARES = {"clip": 0.15, "vae": 0.20, "unet": 0.65}
MIN_STAGE_MINUTES = 1.0
# With --compile: the UNet 1.25x in the loop on a 2-core AVX2 CPU in fp32 (its batches keep one shape). The VAE
# measured 0.88x. CLIP's batches change shape every step (captions padded to the longest, a varying number of near
# misses), so dynamo recompiles until its limit and falls back to eager: 10 steps took 7.3 minutes.
COMPILED_STAGES = ("unet",)
LR = {"clip": 5e-4, "vae": 5e-4, "unet": 5e-4}            # peak learning rates; --lr replaces them
WEIGHT_DECAY = {"clip": 0.1, "vae": 0.0, "unet": 0.01}


@dataclass
class Plan:
    """A checked RecipeConfig: everything a stage needs, resolved before any work starts."""

    config: RecipeConfig
    started: float                          # time.time() when the command started: --max-minutes counts from it
    size: ModelSize
    data: torch.utils.data.Dataset
    steps: dict[str, int]
    batch_sizes: dict[str, int]   # images per step, per stage
    resume_stage: str | None = None  # the stage --resume-from-checkpoint PATH names

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    def run_dir(self, stage: str) -> Path:
        return (Path(self.config.work) if self.config.work else runs_folder(self.out)) / stage

    def lr(self, stage: str) -> float:
        return self.config.lr or LR[stage]

    def stop_at(self, stage: str) -> float | None:
        """When `stage` must stop training (time.time()) so that the whole command keeps to --max-minutes: the
        end of its share of the budget, less a little for the work after its training (latent statistics,
        checks, export)."""
        if not self.config.max_minutes:
            return None   # 0: no budget
        stages = list(self.steps)
        shares = budget_shares(tuple(stages))
        budget = self.config.max_minutes * 60
        end = self.started + budget * sum(shares[s] for s in stages[:stages.index(stage) + 1])
        return end - min(60.0, 0.05 * budget * shares[stage])


def checkpoint_stage(checkpoint: Path, stages: tuple[str, ...]) -> str:
    """The stage whose checkpoint `checkpoint` is (from its state.json); BrushworkError unless this command runs it."""
    try:
        stage = json.loads((checkpoint / "state.json").read_text()).get("stage")
    except (OSError, ValueError):
        raise BrushworkError(f"--resume-from-checkpoint {checkpoint}: not a checkpoint folder (no readable "
                             "state.json); give a step-N folder under OUT.runs/STAGE/checkpoints, or 'latest'.") from None
    if stage not in stages:
        raise BrushworkError(f"--resume-from-checkpoint {checkpoint} is a checkpoint of the {stage} stage, which "
                             f"this command does not train ({', '.join(stages)}).")
    return stage


def budget_shares(stages: tuple[str, ...]) -> dict[str, float]:
    total = sum(BUDGET_SHARES[s] for s in stages)
    return {s: BUDGET_SHARES[s] / total for s in stages}


def _resume_settings(config: RecipeConfig, stages: tuple[str, ...], size: ModelSize,
                     batch_sizes: dict[str, int]) -> dict:
    keys = [key for group in ("common", *stages) for key in RESUME_KEYS[group]]
    settings = {key: getattr(config, key) for key in keys}
    settings.update(resolution=size.resolution, **{f"{stage}_batch_size": batch_sizes[stage] for stage in stages})
    if "snr_gamma" in settings:
        settings["snr_gamma"] = config.snr_gamma or None   # off is null in recipe.json, as it always was
    return json.loads(json.dumps(settings, default=str))


def plan(config: RecipeConfig, stages: tuple[str, ...] = STAGES, started: float | None = None) -> Plan:
    """Check every input the user can get wrong, before any training starts; BrushworkError if one is off.
    `started` (time.time()) is when --max-minutes starts counting: by default now."""
    started = time.time() if started is None else started
    if config.data is None or config.out is None:
        raise BrushworkError("--data and --out are required, e.g. brushwork train --data shapes --out my-model")
    size = get_size(config.size)
    if config.resolution is not None:
        size = dataclasses.replace(size, resolution=config.resolution)
    vae_factor = 2 ** (len(size.vae["block_out_channels"]) - 1)
    unet_factor = 2 ** (len(size.unet["block_out_channels"]) - 1)
    if size.resolution % (vae_factor * unet_factor) or size.resolution % size.clip_vision["patch_size"]:
        raise BrushworkError(f"resolution {size.resolution} does not fit model size {size.name!r}: it must be a "
                             f"multiple of {vae_factor * unet_factor} (VAE and UNet downsampling) and of "
                             f"{size.clip_vision['patch_size']} (CLIP patch size), e.g. 64.")
    if config.vae_crop is None:
        config = dataclasses.replace(config, vae_crop=size.resolution // 2)
    if not (vae_factor <= config.vae_crop <= size.resolution and config.vae_crop % vae_factor == 0):
        raise BrushworkError(f"--vae-crop {config.vae_crop} must be a multiple of {vae_factor} (the VAE's "
                             f"downsampling) from {vae_factor} to the resolution, {size.resolution}; e.g. "
                             f"{size.resolution // 2}.")
    steps = {stage: getattr(config, f"steps_{stage}") or size.steps[stage] for stage in stages}
    batch_sizes = {stage: config.batch_size or size.batch_sizes[stage] for stage in stages}
    if min(batch_sizes.values()) < 1 or min(steps.values()) < 1:
        raise BrushworkError("--batch-size and the step counts must be at least 1.")
    noise_schedule(config.beta_schedule, config.prediction_type, zero_terminal_snr=config.zero_terminal_snr)  # raises
    if config.max_minutes is not None and config.max_minutes < 0:
        raise BrushworkError(f"--max-minutes must be a number of minutes, or 0 for no time limit; got "
                             f"{config.max_minutes:g}.")
    if config.max_minutes:
        shares = budget_shares(stages)
        least = max(MIN_STAGE_MINUTES / share for share in shares.values())
        if not config.max_minutes >= least:
            split = ", ".join(f"{stage} {share:.0%}" for stage, share in shares.items())
            raise BrushworkError(f"--max-minutes {config.max_minutes:g} is too little for {' + '.join(stages)}: the "
                                 f"budget is split {split}, and each stage needs at least {MIN_STAGE_MINUTES:g} "
                                 f"minute, so give at least {math.ceil(least)} minutes.")
    if config.lr is not None and not config.lr > 0:
        raise BrushworkError(f"--lr must be a positive number, got {config.lr}.")
    if config.lr_scheduler not in LR_SCHEDULES:
        raise BrushworkError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULES)}, got {config.lr_scheduler!r}.")
    if (config.lr_warmup_steps or 0) < 0 or config.gradient_accumulation_steps < 1:
        raise BrushworkError("--lr-warmup-steps must be at least 0 and --gradient-accumulation-steps at least 1.")
    uneven = [(stage, b) for stage, b in batch_sizes.items() if b % config.gradient_accumulation_steps]
    if uneven:
        stage, batch_size = uneven[0]
        raise BrushworkError(f"The {stage} stage's batch of {batch_size} images must be a multiple of "
                             f"--gradient-accumulation-steps {config.gradient_accumulation_steps}: each step's images "
                             "are split into that many micro-batches. Pass a --batch-size that is.")
    resume_stage = None
    if config.resume_from_checkpoint is not None:
        resume_stage = None if config.resume_from_checkpoint == "latest" else checkpoint_stage(
            Path(config.resume_from_checkpoint), stages)
        config = dataclasses.replace(config, resume=True)
    if config.hard_negatives is not None and not 0 <= config.hard_negatives <= 1:
        raise BrushworkError(f"--hard-negatives is a share of the images, from 0 to 1; got {config.hard_negatives}.")
    if not 0 <= config.caption_dropout < 1:
        raise BrushworkError(f"caption dropout must be in [0, 1), got {config.caption_dropout}.")
    check_report_to(config.report_to)
    if config.compile:
        require_cpp_compiler("train without --compile")

    out = Path(config.out)
    check_writable(out)
    work = Path(config.work) if config.work else runs_folder(out)
    check_writable(work)
    if not config.resume:
        if stages == STAGES and any(p.name != "runs" for p in out.iterdir()):
            raise BrushworkError(f"{out} is not empty: pass --resume to continue its training, or choose a new "
                                 "folder for --out.")
        for stage in stages:
            if list_checkpoints(work / stage):
                raise BrushworkError(f"{work / stage} already holds a {stage} run: pass --resume to continue it, "
                                     "or choose a new folder.")
    if config.init_unet is not None and not (resolve_model(config.init_unet) / "unet" / "config.json").is_file():
        raise BrushworkError(f"--init {config.init_unet} has no unet/ folder: give a diffusion model folder "
                             "(from `brushwork train`) or a shipped model name such as 'shapes'.")
    trained = json.loads((out / "training.json").read_text()) if (out / "training.json").is_file() else {}
    if trained.get("size", size.name) != size.name:
        raise BrushworkError(f"{out} holds a model of size {trained['size']!r} and this command trains size "
                             f"{size.name!r}, which does not fit it: pass --size {trained['size']}.")
    if "unet" in stages and "clip" not in stages:
        needed = ("text_encoder", "tokenizer") + (() if "vae" in stages else ("vae",))
        missing = [name for name in needed if not (out / name).is_dir()]
        if missing:
            raise BrushworkError(f"{out} has no {', '.join(missing)}/: train the clip and vae stages into it first "
                                 "(brushwork train clip / train vae), or run the whole recipe.")

    data = open_dataset(config.data, resolution=size.resolution, n=config.n, seed=config.seed,
                        options=DataOptions(config.split, config.image_column, config.caption_column))
    if process_state().is_main_process:
        for line in report_lines(config.data, data):
            print(line)
    if len(data) == 0:
        raise BrushworkError(f"data set {config.data!r} has no items: add images with captions.")
    if config.hard_negatives is None:   # the default: near misses wherever the captions allow them
        config = dataclasses.replace(config, hard_negatives=1.0 if has_near_misses(data.captions()) else 0.0)
        if "clip" in stages and not config.hard_negatives:
            print(f"The captions of {config.data} are not in the shapes grammar: CLIP trains without near misses.")
    elif "clip" in stages and config.hard_negatives > 0:
        require_near_misses(data.captions(), "--hard-negatives", config.data)

    settings = _resume_settings(config, stages, size, batch_sizes)
    recorded = work / "recipe.json"
    previous = json.loads(recorded.read_text()) if recorded.is_file() else {}
    if config.resume:
        changed = {k: (previous[k], v) for k, v in settings.items() if k in previous and previous[k] != v}
        if changed:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise BrushworkError(f"cannot resume {out}: it was trained with other settings ({detail}). Use the "
                                 "original settings, or train into a new folder.")
    if process_state().is_main_process:
        recorded.write_text(json.dumps(previous | settings, indent=2) + "\n")
    return Plan(config, started, size, data, steps, batch_sizes, resume_stage)


def _train_config(p: Plan, stage: str, ema_decay: float | None = None) -> TrainConfig:
    steps = p.steps[stage]
    c = p.config
    # by default 5% of the steps the stage trains (those its time budget allows, once measured), at most 500
    warmup = dict(warmup_steps=500, warmup_share=0.05) if c.lr_warmup_steps is None else dict(
        warmup_steps=c.lr_warmup_steps)
    return TrainConfig(out_dir=p.run_dir(stage), max_steps=steps, batch_size=p.batch_sizes[stage],
                       grad_accum=c.gradient_accumulation_steps, lr=p.lr(stage), weight_decay=WEIGHT_DECAY[stage],
                       **warmup, lr_schedule=c.lr_scheduler, mixed_precision=c.mixed_precision,
                       ema_decay=ema_decay, checkpoint_every=c.checkpoint_every, sample_every=c.sample_every,
                       seed=c.seed, resume=c.resume, num_workers=c.num_workers, stop_at=p.stop_at(stage),
                       report_to=c.report_to, compile=c.compile and stage in COMPILED_STAGES,
                       resume_from=Path(c.resume_from_checkpoint) if stage == p.resume_stage else None)


def _main_process() -> bool:
    return process_state().is_main_process


def _barrier() -> None:
    process_state().wait_for_everyone()


def _record(p: Plan, stage: str, started: float, result, parameters: dict[str, int], **extra) -> None:
    """Add a stage's facts to MODEL/training.json and rewrite the model card from it."""
    if not _main_process():
        return
    path = p.out / "training.json"
    facts = json.loads(path.read_text()) if path.is_file() else {"stages": {}}
    lines = result.log_path.read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    commands = facts.get("commands", [])
    if p.config.command and p.config.command not in commands:
        commands.append(p.config.command)   # a resumed or staged training adds its command to the history
    facts.update(data=p.config.data, n=len(p.data), seed=p.config.seed, data_report=data_facts(p.data), size=p.size.name, resolution=p.size.resolution,
                 commands=commands, machine=machine_facts(), command_wall_time_s=round(time.time() - p.started, 1),
                 versions={"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "transformers": transformers.__version__})
    facts["stages"][stage] = {"steps": result.step, "batch_size": p.batch_sizes[stage], "lr": p.lr(stage),
                              "final_loss": last.get("loss"), "train_time_s": round(last.get("elapsed_s", 0.0), 1),
                              "wall_time_s": round(time.time() - started, 1), "parameters": parameters,
                              "finished": datetime.datetime.now().isoformat(timespec="seconds"), **extra}
    if stage == "unet":
        facts["schedule"] = noise_schedule(p.config.beta_schedule, p.config.prediction_type,
                                           zero_terminal_snr=p.config.zero_terminal_snr)
        facts["ema_decay"] = p.config.ema_decay or None
    path.write_text(json.dumps(facts, indent=2) + "\n")
    (p.out / "README.md").write_text(model_card(facts))


def machine_facts() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    machine = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "platform": platform.platform()}
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
    return machine


def describe_machine(machine: dict) -> str:
    hardware = f"{machine['cpu']} ({machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads)"
    if "gpu" in machine:
        hardware += f", GPU {machine['gpu']}"
    return f"{hardware}, {machine['platform']}"


def model_card(facts: dict) -> str:
    hardware = describe_machine(facts["machine"])
    rows = "\n".join(
        f"| {name} | {s['steps']} | {s['batch_size']} | {s['lr']} | {s['final_loss']:.4g} | "
        f"{s['train_time_s'] / 60:.1f} min | {', '.join(f'{k} {v / 1e6:.2f}M' for k, v in s['parameters'].items())} "
        f"| {s['finished']} |"
        for name, s in facts["stages"].items() if s["final_loss"] is not None)
    schedule = facts.get("schedule")
    schedule_line = (f"- Noise schedule: {schedule['beta_schedule']}, {schedule['num_train_timesteps']} steps, "
                     f"{schedule['prediction_type']} prediction; UNet weights are the EMA (decay "
                     f"{facts.get('ema_decay')}).\n" if schedule else "")
    base = facts["stages"].get("unet", {}).get("initialized_from")
    return front_matter(facts, library="diffusers", tags=["diffusion"], base_model=base and base["model"]) + f"""\
# brushwork model ({facts['size']})

A text-to-image model trained from scratch with brushwork, in diffusers' StableDiffusionPipeline layout.
`clip/` holds the CLIP model used for evaluation (a shipped copy keeps only its vision tower: the text tower
is `text_encoder/`).

- Commands, in order:
{_command_lines(facts)}{_wall_time_line(facts)}
- Data: {data_line(facts)}
- Machine: {hardware}
- Versions: {', '.join(f'{name} {version}' for name, version in facts['versions'].items())}
{schedule_line}
| stage | steps | batch | lr | final loss | train time | parameters | finished |
| --- | --- | --- | --- | --- | --- | --- | --- |
{rows}
{_reconstruction_line(facts)}{_init_line(facts)}"""


LICENSES = {"shapes": "apache-2.0", "emoji": "cc-by-sa-4.0"}   # emoji: OpenMoji's ShareAlike licence


def front_matter(facts: dict, library: str, tags: list[str], base_model: str | None = None) -> str:
    """The card's YAML metadata, as the Hub reads it (huggingface_hub.ModelCard.load). A user's own data set
    gets license "other": only its owner knows its terms. Data sets and base models are named, not given as
    local paths."""
    from huggingface_hub import ModelCardData

    metadata = ModelCardData(license=LICENSES.get(facts["data"], "other"), library_name=library,
                             pipeline_tag="text-to-image", tags=["brushwork", "text-to-image", *tags],
                             datasets=[card_name(facts["data"])], base_model=base_model and card_name(base_model))
    return f"---\n{metadata.to_yaml()}\n---\n\n"


def card_name(spec: str) -> str:
    """A data set or model as named on a card: a shipped name as is, a path by its last part."""
    return Path(str(spec).rstrip("/")).name or str(spec)


def data_line(facts: dict) -> str:
    """The card's data line: the source, the items trained on, and the problems `train` skipped."""
    report = facts.get("data_report") or {}
    where = report.get("layout") and f" ({report['layout']} layout" + (
        f", split {report['split']!r})" if report.get("split") else ")")
    line = f"`{facts['data']}`{where or ''}, {facts['n']} items at {facts['resolution']}×{facts['resolution']}"
    if report.get("skipped"):
        kinds = ", ".join(f"{kind} {count}" for kind, count in report["reasons"].items())
        line += f"; {report['skipped']} skipped ({kinds}; training.json lists them)"
    if report.get("shapes_tasks"):
        line += "; tasks " + " : ".join(f"{task} {weight:g}" for task, weight in report["shapes_tasks"].items())
    if report.get("hold_out"):
        line += "; held out (never in training): " + ", ".join(f"`{text}`" for text in report["hold_out"])
    return line


def _command_lines(facts: dict) -> str:
    commands = facts.get("commands") or [facts.get("command", "")]
    return "\n".join(f"  - `{command}`" for command in commands)


def _wall_time_line(facts: dict) -> str:
    seconds = facts.get("command_wall_time_s")
    return "" if seconds is None else (f"\n- Wall time of the last command: {seconds / 60:.1f} min (everything it did: "
                                       "tokenizer, data, training, checks, export)")


def _reconstruction_line(facts: dict) -> str:
    exact = facts["stages"].get("vae", {}).get("reconstructions_exact")
    return "" if exact is None else f"\nThe shapes checker passes {exact:.1%} of held-out VAE reconstructions.\n"


def _init_line(facts: dict) -> str:
    source = facts["stages"].get("unet", {}).get("initialized_from")
    if not source:
        return ""
    earlier = f" after {source['steps']:,} steps" if source.get("steps") else ""
    return (f"\nThe UNet was fine-tuned: it started from the UNet of `{source['model']}`{earlier}; the unet row "
            "counts only the steps of this run.\n")


def _image_processor(size: ModelSize) -> CLIPImageProcessor:
    # The vision tower was trained on pixels scaled to [-1, 1]: mean 0.5 and std 0.5 reproduce that.
    return CLIPImageProcessor(size={"shortest_edge": size.resolution},
                              crop_size={"height": size.resolution, "width": size.resolution},
                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def train_clip(p: Plan) -> CLIPModel:
    """Tokenizer (trained on the captions, or reused when resuming) and CLIP; writes tokenizer/, clip/, text_encoder/."""
    started = time.time()
    tokenizer_dir = p.out / "tokenizer"
    if not (p.config.resume and (tokenizer_dir / "vocab.json").is_file()) and _main_process():
        train_tokenizer(p.data.captions(), tokenizer_dir, vocab_size=p.config.vocab_size)
    _barrier()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    clip = build_clip(p.size, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, seed=p.config.seed)
    result = run(ClipStage(p.data, tokenizer, clip, hard_negatives=p.config.hard_negatives),
                 _train_config(p, "clip"))
    clip = result.modules["clip"]
    if _main_process():
        clip.save_pretrained(p.out / "clip")
        tokenizer.save_pretrained(p.out / "clip")
        _image_processor(p.size).save_pretrained(p.out / "clip")
        text_encoder_from_clip(clip).save_pretrained(p.out / "text_encoder")
    near_misses = {"hard_negatives": p.config.hard_negatives} if p.config.hard_negatives else {}
    _record(p, "clip", started, result, {"text": count_parameters(clip.text_model),
                                         "vision": count_parameters(clip.vision_model)}, **near_misses)
    _barrier()
    return clip


def train_vae(p: Plan) -> AutoencoderKL:
    """VAE, then its latents normalised per channel on the data; writes vae/."""
    started = time.time()
    stage = VaeStage(p.data, build_vae(p.size, seed=p.config.seed), reconstruction=p.config.reconstruction,
                     kl_weight=p.config.kl_weight, crop=p.config.vae_crop)
    result = run(stage, _train_config(p, "vae"))
    vae = result.modules["vae"].vae.eval()
    extra = {"latent_stats": normalize_latents(vae, p.data)}
    if p.config.data == "shapes" and _main_process():
        extra["reconstructions_exact"] = shapes_reconstruction_accuracy(vae, seed=p.config.seed + 1)
        if extra["reconstructions_exact"] < 0.95:   # the highest faithfulness target (single objects)
            print(f"Warning: the shapes checker passes only {extra['reconstructions_exact']:.0%} of the VAE's "
                  "reconstructions; the UNet cannot do better than its VAE: train the VAE longer (--steps-vae, "
                  "or more --max-minutes).")
    if _main_process():
        vae.save_pretrained(p.out / "vae")
    _record(p, "vae", started, result, {"vae": count_parameters(vae)}, **extra)
    _barrier()
    return vae


@torch.no_grad()
def shapes_reconstruction_accuracy(vae: AutoencoderKL, n: int = 256, seed: int = 1) -> float:
    """Share of held-out shapes images whose VAE reconstruction the exact shapes checker still passes: the
    ceiling for the whole model's prompt faithfulness (a colour the VAE cannot keep, the UNet cannot draw)."""
    shapes = open_dataset("shapes", resolution=vae.config.sample_size, n=n, seed=seed, shapes_tasks=None)
    device = next(vae.parameters()).device
    passed = 0
    for start in range(0, n, 64):
        items = [shapes[i] for i in range(start, min(n, start + 64))]
        pixels = torch.stack([item["pixel_values"] for item in items]).to(device)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1).cpu()
        passed += sum(check(to_image(image), item["text"]).ok for image, item in zip(decoded, items))
    return passed / n


def train_unet(p: Plan) -> StableDiffusionPipeline:
    """UNet on the frozen text encoder and VAE in MODEL; writes the pipeline: unet/ (EMA weights), scheduler/,
    model_index.json."""
    started = time.time()
    tokenizer = CLIPTokenizer.from_pretrained(p.out / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(p.out / "text_encoder")
    vae = AutoencoderKL.from_pretrained(p.out / "vae")
    c = p.config
    steps = p.steps["unet"]
    unet, extra = build_unet(p.size, seed=p.config.seed), {}
    if c.init_unet is not None:
        source = resolve_model(c.init_unet)
        unet = initial_unet(source, text_encoder, vae)
        extra["initialized_from"] = _init_facts(c.init_unet)
        scheduler_config = source / "scheduler" / "scheduler_config.json"
        target = json.loads(scheduler_config.read_text()).get("prediction_type") if scheduler_config.is_file() else None
        if target and target != c.prediction_type and _main_process():
            print(f"{c.init_unet} predicts {target}; this run trains it to predict {c.prediction_type} (pass "
                  f"--prediction {target} to keep its target).")
    # Caching every latent up front pays off when training sees each item at least once.
    attention_loss = c.attention_loss
    if attention_loss > 0 and not p.data[0].get("regions"):
        if _main_process():
            print(f"{c.data} has no object regions: the UNet trains without the attention loss.")
        attention_loss = 0.0
    stage = UnetStage(p.data, unet, text_encoder, tokenizer, vae, beta_schedule=c.beta_schedule,
                      prediction_type=c.prediction_type, zero_terminal_snr=c.zero_terminal_snr,
                      snr_gamma=c.snr_gamma or None, caption_dropout=c.caption_dropout,
                      validation_prompts=c.validation_prompts,
                      cache_latents=steps * p.batch_sizes["unet"] >= len(p.data), attention_loss=attention_loss)
    result = run(stage, _train_config(p, "unet", ema_decay=c.ema_decay or None))
    unet = (result.ema or result.modules)["unet"]
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.to("cpu"),
                                       scheduler=inference_scheduler(stage.schedule), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if _main_process():
        pipeline.save_pretrained(p.out)
    _record(p, "unet", started, result, {"unet": count_parameters(unet)}, **extra)
    _barrier()
    return pipeline


def initial_unet(model: Path, text_encoder: CLIPTextModel, vae: AutoencoderKL) -> UNet2DConditionModel:
    """The UNet of `model`, in fp32, to fine-tune; BrushworkError if it cannot work with this text encoder and VAE."""
    unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float32)
    wanted = {"cross_attention_dim": text_encoder.config.hidden_size, "in_channels": vae.config.latent_channels}
    wrong = {k: (unet.config[k], v) for k, v in wanted.items() if unet.config[k] != v}
    if wrong:
        detail = ", ".join(f"{k} {a} where this model needs {b}" for k, (a, b) in wrong.items())
        raise BrushworkError(f"the UNet in {model} does not fit this model's text encoder and VAE ({detail}).")
    return unet


def export_checkpoint(checkpoint: Path, out: Path, model: Path | None = None, ema: bool = True) -> Path:
    """Writes a checkpoint of the UNet stage (MODEL.runs/unet/checkpoints/step-N) or of `train distill`
    (MODEL.runs/distill/checkpoints/step-N) as a pipeline folder with MODEL's text encoder, tokenizer and VAE, so
    that generate, eval and serve take a run's model before the run ends. The UNet config and noise schedule come
    from the checkpoint's own state.json; the folder is written beside `out` and renamed into place."""
    checkpoint, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    if not checkpoint.is_dir():
        beside = sorted(p.name for p in checkpoint.parent.glob("step-*") if p.is_dir())
        there = f"; the checkpoints in {checkpoint.parent}: {', '.join(beside)}" if beside else ""
        raise BrushworkError(f"{checkpoint} is not a folder{there}.")
    try:   # the stage first: another stage's checkpoint lacks the UNet's weights, which would be a worse message
        stage = json.loads((checkpoint / "state.json").read_text()).get("stage", "unet")
    except (OSError, ValueError, AttributeError):
        stage = None   # checkpoint_problem names what is wrong with state.json
    if stage is not None and stage not in ("unet", "distill"):
        raise BrushworkError(f"{checkpoint} is a checkpoint of the {stage} stage; only the checkpoints of the UNet "
                             f"stage and of train distill make a pipeline.")
    weights = "student" if stage == "distill" else "unet"
    problem, _ = checkpoint_problem(checkpoint, [weights], ema)
    if problem:
        where = f"MODEL.runs/{stage}/checkpoints" if stage else \
            "MODEL.runs/unet/checkpoints or MODEL.runs/distill/checkpoints"
        raise BrushworkError(f"{checkpoint} is not a usable checkpoint: {problem}. Give a step-N folder under {where}.")
    state = json.loads((checkpoint / "state.json").read_text())
    fingerprint = state["fingerprint"]
    runs = checkpoint.parent.parent.parent
    if model is None:   # MODEL.runs/ beside the model, or MODEL/runs/ inside an older one
        model = runs.with_name(runs.name.removesuffix(".runs")) if runs.name.endswith(".runs") else runs.parent
    model = resolve_model(model)   # a teacher may be a shipped name
    missing = [part for part in ("text_encoder", "tokenizer", "vae") if not (model / part).is_dir()]
    if missing:
        source = "the folder the UNet trained in" if stage == "unet" else "the teacher (a distillation writes its " \
                 "own folder only when it ends)"
        raise BrushworkError(f"{model} has no {', '.join(missing)}/: pass --model, {source}.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BrushworkError(f"{out} is not an empty folder: choose a new one.")
    unet = UNet2DConditionModel.from_config(fingerprint["unet"])
    parts = dict(vae=AutoencoderKL.from_pretrained(model / "vae").float(),   # a shipped model's are fp16
                 text_encoder=CLIPTextModel.from_pretrained(model / "text_encoder").float(),
                 tokenizer=CLIPTokenizer.from_pretrained(model / "tokenizer"), unet=unet, safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    weights_file = checkpoint / f"{'ema-' if ema else ''}{weights}.safetensors"
    if stage == "unet":
        load_model(unet, str(weights_file))
        pipeline = StableDiffusionPipeline(**parts, scheduler=inference_scheduler(fingerprint["schedule"]))
    else:
        student = load_file(weights_file)   # the student and its target network: keep the student's UNet
        unet.load_state_dict({name.removeprefix("unet."): tensor for name, tensor in student.items()
                              if name.startswith("unet.")})
        pipeline = LatentConsistencyModelPipeline(**parts, scheduler=lcm_scheduler(fingerprint["schedule"],
                                                                                   fingerprint["solver_steps"]))
    facts_path = model / "training.json"
    facts = json.loads(facts_path.read_text()) if facts_path.is_file() else {}
    facts["exported_checkpoint"] = {"path": str(checkpoint.resolve()), "step": state["step"],
                                    "weights": "ema" if ema else "raw"}
    if stage == "distill":
        facts |= {"kind": "lcm", "teacher": str(model)}
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        pipeline.save_pretrained(staging)
        (staging / "training.json").write_text(json.dumps(facts, indent=2))
        if (model / "clip").is_dir():
            shutil.copytree(model / "clip", staging / "clip")
        staging.replace(out)
    except OSError as error:
        raise BrushworkError(f"cannot write {out}: {error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _init_facts(model: str) -> dict:
    """Where a fine-tuned UNet started: the source as given (path or shipped name) and how long its UNet trained."""
    facts_path = resolve_model(model) / "training.json"
    facts = json.loads(facts_path.read_text()) if facts_path.is_file() else {}
    source_unet = facts.get("stages", {}).get("unet", {})
    return {"model": str(model), "steps": source_unet.get("steps"),
            "train_time_s": source_unet.get("train_time_s")}


def train(config: RecipeConfig, stages: tuple[str, ...] = STAGES, started: float | None = None) -> Path:
    """Run `stages` of the recipe in order (all by default) into config.out; returns the model folder. `started`:
    when the --max-minutes budget starts (time.time(); by default now)."""
    p = plan(config, stages, started)
    for stage in stages:
        {"clip": train_clip, "vae": train_vae, "unet": train_unet}[stage](p)
    return p.out
