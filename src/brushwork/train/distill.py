"""Few-step diffusion by latent consistency distillation (LCD; Luo et al. 2023, arXiv 2310.04378), a Stage of the
one loop: `brushwork train distill --model shapes --out shapes-fast`.

Each step, for latents x₀ of the data and a guidance w ~ U[w_min, w_max] (w = guidance scale - 1):
- a solver timestep t = t_{n+k} of a grid of `solver_steps` (k = num_train_timesteps / solver_steps, 20 of
  1000 for 50), and x_t = α_t x₀ + σ_t ε (α_t = √ᾱ_t, σ_t = √(1 - ᾱ_t), the teacher's own noise schedule);
- the teacher, under classifier-free guidance at w (its condition and the empty caption), takes one DDIM step
  from t to s = t - k: x_s = α_s x̂₀ʷ + σ_s ε̂ʷ, with x̂₀ʷ = x̂₀(cond) + w (x̂₀(cond) - x̂₀(uncond)) and ε̂ʷ alike;
- the consistency function f(x, t) = c_skip(t) x + c_out(t) x̂₀(x, t) (c_skip = σ_d² / ((10t)² + σ_d²),
  c_out = 10t / √((10t)² + σ_d²), σ_d = 0.5: LCMScheduler's, so f(x, 0) = x) of the student at (x_t, t) must
  match that of the target network at (x_s, s): a Huber loss √(d² + c²) - c, d their difference.
The student is the teacher's UNet plus a guidance input (`time_cond_proj_dim`: the embedding of w joins the
time embedding), so that a sampling step is one UNet call with no CFG batch. The target network is an EMA of
the student (decay `target_decay`, moved after every optimizer step); the loop's own EMA of the student is what
the model folder keeps. The folder is diffusers' LatentConsistencyModelPipeline layout, with LCMScheduler.
"""

from __future__ import annotations

import copy
import datetime
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from diffusers import DDPMScheduler, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from brushwork.data.dataset import DataOptions, data_facts, open_dataset, report_lines
from brushwork.errors import BrushworkError
from brushwork.generation.diffusion_model import DiffusionModel, guidance_embedding
from brushwork.generation.loading import load_diffusion_model
from brushwork.generation.registry import check_model_exists, resolve_model, weights_hash
from brushwork.models.gan import is_gan_folder
from brushwork.models.sizes import count_parameters
from brushwork.train.loop import TrainConfig, check_report_to, run
from brushwork.train.options import DistillConfig, runs_folder, settings, stop_time
from brushwork.train.recipe import card_name, data_line, describe_machine, front_matter, machine_facts
from brushwork.train.stages import LatentTextStage, _randn, _unwrap, _validation_items, image_grid, lcm_scheduler

W_EMBEDDING_DIM = 256          # the student's time_cond_proj_dim, as in diffusers' LCM models
SAMPLE_STEPS = (1, 2, 4)       # the rows of a sample grid
SAMPLE_GUIDANCE = 5.0          # brushwork's default guidance scale (w = 4)


class ConsistencyStudent(nn.Module):
    """The student UNet and its target network (an EMA of it) as one module, so that a checkpoint holds both and a
    resumed run goes on exactly; only `unet` trains. forward is the student's call, as DDP needs."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self.target = copy.deepcopy(unet).requires_grad_(False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, w_embedding: torch.Tensor):
        return self.unet(x_t, t, encoder_hidden_states=text, timestep_cond=w_embedding).sample

    @torch.no_grad()
    def update_target(self, decay: float) -> None:
        torch._foreach_lerp_(list(self.target.parameters()), list(self.unet.parameters()), 1.0 - decay)


def student_unet(teacher: UNet2DConditionModel) -> UNet2DConditionModel:
    """The teacher's UNet with a guidance input (time_cond_proj_dim) whose projection starts at zero, so that the
    student starts as the teacher's conditional prediction."""
    unet = UNet2DConditionModel.from_config({**teacher.config, "time_cond_proj_dim": W_EMBEDDING_DIM})
    missing, unexpected = unet.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise BrushworkError(f"the teacher's UNet does not fit its own config (missing {missing}, unexpected "
                             f"{unexpected}).")
    nn.init.zeros_(unet.time_embedding.cond_proj.weight)
    return unet


def predicted_x0(output: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
                 prediction_type: str) -> torch.Tensor:
    """x̂₀ from a UNet output at x_t = α_t x₀ + σ_t ε: (x_t - σ_t ε̂) / α_t for ε-prediction, α_t x_t - σ_t v̂ for v."""
    if prediction_type == "epsilon":
        return (x_t - sigma_t * output) / alpha_t
    return alpha_t * x_t - sigma_t * output


def predicted_noise(output: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """ε̂ from a UNet output: itself for ε-prediction, α_t v̂ + σ_t x_t for v-prediction."""
    if prediction_type == "epsilon":
        return output
    return alpha_t * output + sigma_t * x_t


class DistillStage(LatentTextStage):
    """Latent consistency distillation of `teacher` into `student` (see the module docstring). Latents and text
    embeddings come cached, as for UnetStage (LatentTextStage)."""

    name = "distill"

    def __init__(self, data: Dataset, teacher: DiffusionModel, student: ConsistencyStudent, teacher_hash: str,
                 w_min: float = 2.0, w_max: float = 8.0, solver_steps: int = 50, huber_c: float = 0.001,
                 target_decay: float = 0.95, cache_latents: bool = True):
        super().__init__(data, teacher.text_encoder, teacher.tokenizer, teacher.vae, cache_latents)
        self.teacher = teacher.unet
        self.teacher_hash = teacher_hash
        self.student = student
        self.prediction_type = teacher.scheduler_config["prediction_type"]
        self.noise_scheduler = DDPMScheduler.from_config(teacher.scheduler_config)
        self.lcm_scheduler = lcm_scheduler(teacher.scheduler_config, solver_steps)
        self.w_min, self.w_max = w_min, w_max
        self.solver_steps, self.huber_c, self.target_decay = solver_steps, huber_c, target_decay
        self.k = self.noise_scheduler.config.num_train_timesteps // solver_steps   # timesteps one solver step skips
        self.solver_timesteps = torch.arange(1, solver_steps + 1) * self.k - 1     # LCMScheduler's grid: k-1 .. T-1

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def after_step(self, step: int) -> None:
        self.student.update_target(self.target_decay)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """α_t = √ᾱ_t and σ_t = √(1 - ᾱ_t), shaped to broadcast over latents."""
        alpha_bar = self.noise_scheduler.alphas_cumprod.to(t.device)[t][:, None, None, None]
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def consistency(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x_t, t) = c_skip(t) x_t + c_out(t) x̂₀: the boundary-condition parametrisation, f(x, 0) = x."""
        c_skip, c_out = self.lcm_scheduler.get_scalings_for_boundary_condition_discrete(t.float())
        alpha_t, sigma_t = self.alpha_sigma(t)
        x0 = predicted_x0(output.float(), x_t, alpha_t, sigma_t, self.prediction_type)
        return c_skip[:, None, None, None] * x_t + c_out[:, None, None, None] * x0

    @torch.no_grad()
    def teacher_ddim_step(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, text: torch.Tensor,
                          w: torch.Tensor) -> torch.Tensor:
        """x_s = α_s x̂₀ʷ + σ_s ε̂ʷ: one DDIM step of the teacher from t to s, guided at w: cond + w (cond - uncond)."""
        self.teacher.to(x_t.device)
        empty = self.text_embeddings([""], x_t.device).expand_as(text)
        output = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([empty, text]))
        uncond, cond = output.sample.float().chunk(2)
        alpha_t, sigma_t = self.alpha_sigma(t)
        w = w[:, None, None, None]
        x0 = [predicted_x0(o, x_t, alpha_t, sigma_t, self.prediction_type) for o in (uncond, cond)]
        noise = [predicted_noise(o, x_t, alpha_t, sigma_t, self.prediction_type) for o in (uncond, cond)]
        x0_w = x0[1] + w * (x0[1] - x0[0])
        noise_w = noise[1] + w * (noise[1] - noise[0])
        alpha_s, sigma_s = self.alpha_sigma(s)
        return alpha_s * x0_w + sigma_s * noise_w

    def loss(self, optimizer: str, modules: dict[str, nn.Module], batch: dict, generator: torch.Generator):
        x0 = self.batch_latents(batch)
        device, batch_size = x0.device, x0.shape[0]
        draw = generator.device
        n = torch.randint(0, self.solver_steps, (batch_size,), generator=generator, device=draw).to(device)
        t = self.solver_timesteps.to(device)[n]      # t_{n+k}: where the student starts
        s = (t - self.k).clamp(min=0)                # t_n: one solver step nearer the data, where the target is
        x_t = self.noise_scheduler.add_noise(x0, _randn(x0.shape, generator, device), t)
        u = torch.rand(batch_size, generator=generator, device=draw).to(device)
        w = self.w_min + (self.w_max - self.w_min) * u             # w ~ U[w_min, w_max]
        w_embedding = guidance_embedding(w, W_EMBEDDING_DIM)
        text = self.text_embeddings(batch["text"], device)

        student = self.consistency(modules["student"](x_t, t, text, w_embedding), x_t, t)
        with torch.no_grad():
            x_s = self.teacher_ddim_step(x_t, t, s, text, w)
            target = _unwrap(modules["student"]).target(x_s, s, encoder_hidden_states=text, timestep_cond=w_embedding)
            target = self.consistency(target.sample, x_s, s)
        difference = student.float() - target.float()
        loss = (torch.sqrt(difference ** 2 + self.huber_c ** 2) - self.huber_c).mean()
        return loss, {"mse": F.mse_loss(student.detach().float(), target.float())}

    def fingerprint(self) -> dict:
        return {"stage": self.name, "unet": dict(self.student.unet.config), "teacher": self.teacher_hash,
                "schedule": dict(self.noise_scheduler.config), "w": [self.w_min, self.w_max],
                "solver_steps": self.solver_steps, "huber_c": self.huber_c, "target_decay": self.target_decay,
                "scaling_factor": self.vae.config.scaling_factor, "data_size": len(self.data)}

    def pipeline(self, unet: UNet2DConditionModel) -> LatentConsistencyModelPipeline:
        return LatentConsistencyModelPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                              unet=unet, scheduler=LCMScheduler.from_config(self.lcm_scheduler.config),
                                              safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)

    @torch.no_grad()
    def sample(self, modules: dict[str, nn.Module], step: int) -> Image.Image:
        """The first captions of the data set, one fixed seed each; a row per number of steps (1, 2, 4)."""
        unet = _unwrap(modules["student"]).unet
        device = next(unet.parameters()).device
        pipe = self.pipeline(unet).to(device)
        pipe.set_progress_bar_config(disable=True)
        prompts = [item["text"] for item in _validation_items(self.data)]
        images = []
        for steps in SAMPLE_STEPS:
            generators = [torch.Generator(device).manual_seed(seed) for seed in range(len(prompts))]
            images += pipe(prompts, num_inference_steps=steps, guidance_scale=SAMPLE_GUIDANCE,
                           generator=generators).images
        return image_grid(images, len(prompts))


def load_teacher(model: str | None) -> tuple[Path, DiffusionModel]:
    """The teacher's path and model; BrushworkError for a missing folder, a GAN or an already distilled model."""
    if model is None:
        raise BrushworkError("--model (the teacher) and --out are required, e.g. brushwork train distill --model "
                             "shapes --out shapes-fast")
    path = resolve_model(model)
    check_model_exists(path)
    if is_gan_folder(path):
        raise BrushworkError(f"{model} is a GAN: it already makes an image in one step, and distillation needs a "
                             "diffusion model as the teacher.")
    teacher = load_diffusion_model(path).to(torch.device("cpu"), torch.float32)   # frozen: eval, no gradients
    if teacher.unet.config.time_cond_proj_dim is not None or "LCM" in teacher.scheduler_config.get("_class_name", ""):
        raise BrushworkError(f"{model} is already a few-step (distilled) model; distil its teacher instead.")
    if teacher.scheduler_config.get("prediction_type") not in ("epsilon", "v_prediction"):
        raise BrushworkError(f"the teacher predicts {teacher.scheduler_config.get('prediction_type')!r}; distillation "
                             "takes epsilon or v_prediction teachers.")
    return path, teacher


def _check(config: DistillConfig) -> None:
    if config.out is None:
        raise BrushworkError("--out is required, e.g. brushwork train distill --model shapes --out shapes-fast")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise BrushworkError(f"output {out} is a file, not a folder: choose a folder path for --out.")
    if not config.resume and out.is_dir() and any(out.iterdir()):
        raise BrushworkError(f"{out} is not empty: pass --resume to continue its distillation, or choose a new "
                             "folder for --out.")
    if config.steps < 1 or not config.lr > 0 or config.huber_c <= 0:
        raise BrushworkError("--steps must be at least 1, and --lr and --huber-c above 0.")
    if not 0 <= config.w_min <= config.w_max:
        raise BrushworkError(f"the guidance range needs 0 <= --w-min <= --w-max, got {config.w_min} and "
                             f"{config.w_max}.")
    if not 0 < config.target_decay < 1:
        raise BrushworkError(f"--target-decay must be between 0 and 1, got {config.target_decay}.")
    check_report_to(config.report_to)


def _teacher_data(teacher: Path) -> tuple[str | None, int | None]:
    """The data set and size the teacher was trained on, from its training.json (None where it says nothing)."""
    facts_path = teacher / "training.json"
    facts = json.loads(facts_path.read_text()) if facts_path.is_file() else {}
    return facts.get("data"), facts.get("n")


def train_distill(config: DistillConfig, started: float | None = None) -> Path:
    """Distil `config.teacher` into a few-step model; write the LatentConsistencyModelPipeline folder (the teacher's
    text encoder, tokenizer, VAE and clip/, the student's UNet, LCMScheduler, README.md and training.json)."""
    command_started = time.time() if started is None else started   # when --max-minutes counts from
    _check(config)
    teacher_path, teacher = load_teacher(config.teacher)
    spec, n = (config.data, config.n) if config.data else _teacher_data(teacher_path)
    if spec is None:
        raise BrushworkError(f"{config.teacher} does not say what it was trained on (no training.json): pass --data.")
    n = config.n or n
    data = open_dataset(spec, resolution=teacher.default_size, n=n, seed=config.seed,
                        options=DataOptions(config.split, config.image_column, config.caption_column))
    if PartialState().is_main_process:
        for line in report_lines(spec, data):
            print(line)
    out = Path(config.out)
    batch_size = config.batch_size or 32
    student = ConsistencyStudent(student_unet(teacher.unet))
    stage = DistillStage(data, teacher, student, weights_hash(teacher_path), w_min=config.w_min, w_max=config.w_max,
                         solver_steps=config.solver_steps, huber_c=config.huber_c, target_decay=config.target_decay,
                         cache_latents=config.steps * batch_size >= len(data))
    started = time.time()
    result = run(stage, TrainConfig(
        out_dir=Path(config.work) if config.work else runs_folder(out) / "distill", max_steps=config.steps,
        batch_size=batch_size, lr=config.lr, weight_decay=0.01, warmup_steps=min(100, config.steps // 20),
        mixed_precision=config.mixed_precision, ema_decay=config.ema_decay or None,
        checkpoint_every=config.checkpoint_every, sample_every=config.sample_every, seed=config.seed,
        resume=config.resume, num_workers=config.num_workers, stop_at=stop_time(command_started, config.max_minutes),
        report_to=config.report_to))
    if PartialState().is_main_process:
        unet = (result.ema or result.modules)["student"].unet.to("cpu")
        stage.pipeline(unet).save_pretrained(out)
        if (teacher_path / "clip").is_dir():
            shutil.copytree(teacher_path / "clip", out / "clip", dirs_exist_ok=True)
        lines = result.log_path.read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
        facts = {"kind": "lcm", "commands": [config.command] if config.command else [], **settings(config),
                 "data": spec, "n": len(data), "data_report": data_facts(data), "resolution": teacher.default_size,
                 "steps": result.step, "batch_size": batch_size, "final_loss": last.get("loss"),
                 "parameters": {"unet": count_parameters(unet)}, "train_time_s": round(last.get("elapsed_s", 0.0), 1),
                 "wall_time_s": round(time.time() - started, 1),
                 "finished": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_facts()}
        (out / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
        (out / "README.md").write_text(_model_card(facts))
    PartialState().wait_for_everyone()
    return out


def _model_card(facts: dict) -> str:
    return front_matter(facts, library="diffusers", tags=["diffusion", "lcm"], base_model=facts["teacher"]) + f"""\
# brushwork few-step model (distilled from {card_name(facts['teacher'])})

A latent consistency model: `{facts['teacher']}` distilled with brushwork (`brushwork train distill`) into a
UNet that samples in 1-8 steps, guidance given as an input (one UNet call per step). It loads in diffusers'
LatentConsistencyModelPipeline (LCMScheduler) and in brushwork (`brushwork generate --model FOLDER --steps 4`).

- Command: {'; '.join(f'`{c}`' for c in facts['commands'])}
- Data: {data_line(facts)}
- Steps: {facts['steps']} (batch {facts['batch_size']}, lr {facts['lr']}); guidance w in [{facts['w_min']}, \
{facts['w_max']}] (scale w + 1), DDIM solver over {facts['solver_steps']} timesteps, Huber c {facts['huber_c']}, \
target decay {facts['target_decay']}; UNet weights are the EMA (decay {facts['ema_decay']})
- Parameters: UNet {facts['parameters']['unet'] / 1e6:.2f}M
- Train time: {facts['train_time_s'] / 60:.1f} min; finished {facts['finished']}
- Machine: {describe_machine(facts['machine'])}
"""
