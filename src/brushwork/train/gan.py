"""Training the text-conditional GAN (brushwork.models.gan) with the shared loop.

Each optimizer step is a D step, then a G step (the loop's optimizer order):
- D: adversarial loss on real (matched) images, G's images and real images paired with another caption of
  the batch or, for a share `mismatch_share` of them, a one-word near miss of their own caption (matching-aware,
  DF-GAN's weights 1, 1/2, 1/2; pairs whose captions are equal are left out),
  plus the R1 penalty (gamma/2)·E‖∇ₓD(x, t)‖² on real matched pairs. R1 is lazy (StyleGAN2): it is
  computed on a random 1 in `r1_every` D steps (drawn from the loop's generator, so resume repeats it) and
  weighted by `r1_every`, which saves most of its double backward pass.
- G: the generator side of the same adversarial loss ("hinge": -D(G(z, t), t); "nonsaturating":
  softplus(-D(G(z, t), t))).
- Optional terms, each off at weight 0: GALIP's CLIP image-caption similarity (G); a contrastive CLIP term (G's
  image must be nearer its own caption than every other caption of the data set: InfoNCE); a ranking of D's
  verdicts (G's image must score higher with its own caption than with a near miss of it). D may have its own
  learning rate (`lr_d`).

Watched in the metrics (the loop prefixes them with d/ and g/): D's accuracy on real vs fake, mean logits,
R1, and `diversity` = mean pairwise distance between G's images in the batch / the same for the real images.
Training stops with a BrushworkError when diversity stays under `collapse_threshold` for
`collapse_patience` consecutive intervals of log_every steps once `collapse_after` steps are done (G starts
out nearly constant); the loop stops on NaN.
"""

from __future__ import annotations

import datetime
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_model
from torch import nn
from torch.utils.data import Dataset
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from brushwork.data.captions import contradictions_by_kind, require_near_misses
from brushwork.data.dataset import DataOptions, data_facts, open_dataset, report_lines
from brushwork.errors import BrushworkError
from brushwork.generation.registry import resolve_model
from brushwork.models.clip import load_clip
from brushwork.models.gan import (Discriminator, Generator, build_discriminator, build_generator, gan_generate,
                                  gan_size, save_generator)
from brushwork.models.sizes import count_parameters
from brushwork.train.loop import BaseStage, TrainConfig, check_report_to, list_checkpoints, process_state, run
from brushwork.train.options import LOSSES, GanTrainConfig, runs_folder, settings, stop_time
from brushwork.train.recipe import card_name, data_line, describe_machine, front_matter, machine_facts
from brushwork.train.stages import image_grid

NUM_SAMPLES = 8
MAX_CACHED_CAPTIONS = 8192


# ---- loss terms ---------------------------------------------------------------------------------


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, mismatched: torch.Tensor,
                       mismatch_valid: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """D's adversarial loss from logits: real matched pairs count as real; G's images and real images with
    a mismatched caption (where `mismatch_valid`) count as fake, each with weight 1/2."""
    if kind == "hinge":
        real_term, fake_term, mismatch_term = F.relu(1 - real), F.relu(1 + fake), F.relu(1 + mismatched)
    else:
        real_term, fake_term, mismatch_term = F.softplus(-real), F.softplus(fake), F.softplus(mismatched)
    return real_term.mean() + 0.5 * (fake_term.mean() + _masked_mean(mismatch_term, mismatch_valid))


def generator_loss(fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor, gamma: float) -> torch.Tensor:
    """(gamma / 2) · mean over the batch of ‖∇ₓ D(x)‖²; real_images must require grad."""
    (gradient,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return gamma / 2 * gradient.float().pow(2).flatten(1).sum(dim=1).mean()


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """1 − cosine similarity between each image's CLIP embedding and its caption's, averaged: 0 when aligned."""
    return 1 - F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1).mean()


def clip_contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, bank_embeds: torch.Tensor,
                          same_caption: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """InfoNCE of each image against its own caption (`text_embeds`, one row per image) and the captions of
    `bank_embeds` [K, D] as negatives, at CLIP's temperature `scale`; `same_caption` [B, K] marks the bank rows
    that are the image's own caption (left out, so a caption is no negative of itself)."""
    image = F.normalize(image_embeds.float(), dim=-1)
    own = scale * (image * F.normalize(text_embeds.float(), dim=-1)).sum(dim=-1, keepdim=True)
    others = (scale * image @ F.normalize(bank_embeds.float(), dim=-1).T).masked_fill(same_caption, float("-inf"))
    return -torch.log_softmax(torch.cat([own, others], dim=1), dim=1)[:, 0].mean()


def pairwise_distance(images: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of the RMS per-pixel difference between two images of the batch."""
    flat = images.detach().float().flatten(1)
    return torch.pdist(flat).mean() / flat.shape[1] ** 0.5


def mismatched_order(texts: list[str], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random cyclic shift of the batch (never the identity) and which shifted pairs really differ."""
    n = len(texts)
    if n < 2:
        return torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
    shift = int(torch.randint(1, n, (1,), generator=generator, device=generator.device))
    order = torch.roll(torch.arange(n), shift)
    valid = torch.tensor([texts[i] != texts[j] for i, j in enumerate(order.tolist())])
    return order, valid


def mismatched_captions(texts: list[str], hard_fraction: float, generator: torch.Generator
                        ) -> tuple[list[str], torch.Tensor]:
    """A wrong caption for each real image and which of them really differ: the caption of another image of the
    batch (mismatched_order), or with probability `hard_fraction`, where the caption is in the shapes grammar, a
    near miss: what changes (shape, colour, size, count, relation) drawn first, then one caption of that kind, so
    that the many colour changes do not crowd out the few shape changes D most needs to see."""
    order, valid = mismatched_order(texts, generator)
    wrong = [texts[j] for j in order.tolist()] if len(texts) > 1 else list(texts)
    if hard_fraction <= 0:
        return wrong, valid
    draws = torch.rand(len(texts), generator=generator, device=generator.device).tolist()
    picks = torch.randint(0, 2**31 - 1, (len(texts), 2), generator=generator, device=generator.device).tolist()
    valid = valid.clone()
    for i, text in enumerate(texts):
        if draws[i] < hard_fraction and (kinds := list(contradictions_by_kind(text).values())):
            near_misses = kinds[picks[i][0] % len(kinds)]
            wrong[i], valid[i] = near_misses[picks[i][1] % len(near_misses)], True
    return wrong, valid


# ---- stage --------------------------------------------------------------------------------------


class GanStage(BaseStage):
    """G and D on images in [-1, 1], conditioned on a frozen CLIP text encoder (features cached per caption)."""

    name = "gan"

    def __init__(self, data: Dataset, generator: Generator, discriminator: Discriminator,
                 text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, loss: str = "hinge", r1_gamma: float = 1.0,
                 r1_every: int = 4, collapse_threshold: float = 0.05, collapse_patience: int = 5,
                 collapse_after: int = 500, log_every: int = 10, grad_accum: int = 1, run_dir: Path | None = None,
                 clip: CLIPModel | None = None, clip_weight: float = 0.0, d_lr_scale: float = 1.0,
                 clip_contrast: float = 0.0, mismatch_share: float = 0.0, near_miss_weight: float = 0.0):
        if loss not in LOSSES:
            raise BrushworkError(f"unknown GAN loss {loss!r}: choose one of {', '.join(LOSSES)}.")
        self.data = data
        self.generator = generator
        self.discriminator = discriminator
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.loss_kind = loss
        self.r1_gamma = r1_gamma
        self.r1_every = r1_every
        self.collapse_threshold = collapse_threshold
        self.collapse_patience = collapse_patience
        self.interval_calls = log_every * grad_accum
        self.collapse_after_calls = collapse_after * grad_accum
        self._d_calls = 0
        self.run_dir = run_dir
        # GALIP's idea, on the model's own CLIP: G is also pulled towards images whose CLIP embedding matches
        # the caption's. The vision tower takes pixels in [-1, 1], as G makes them.
        wants_clip = clip is not None and (clip_weight > 0 or clip_contrast > 0)
        self.clip = clip.requires_grad_(False).eval() if wants_clip else None
        self.clip_weight = clip_weight if self.clip is not None else 0.0
        # The similarity alone is satisfied by an image about as near a wrong caption ("a blue circle" for a
        # wavy "a blue square"); the contrastive term asks for the own caption to win against all the others.
        self.clip_contrast = clip_contrast if self.clip is not None else 0.0
        self._caption_bank: tuple[dict[str, int], torch.Tensor] | None = None
        # Random mismatches mostly differ in colour, so D can match captions by colour alone and G's wrong shapes
        # go unpunished; near misses ("a blue circle" for a blue square) make D check every word.
        self.mismatch_share = mismatch_share
        # The same near misses on G's side: D must rate G's image higher with its own caption than with a near miss
        # (a ranking, so that D's realism verdict, the same for both, cancels out).
        self.near_miss_weight = near_miss_weight
        self.d_lr_scale = d_lr_scale  # D's learning rate over G's (DF-GAN's two time-scale rule: 4)
        self._clip_text_cache: dict[str, torch.Tensor] = {}
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._diversity: list[torch.Tensor] = []
        self._low_intervals = 0

    def modules(self) -> dict[str, nn.Module]:
        return {"d": self.discriminator, "g": self.generator}

    def optimizers(self) -> dict[str, list[str]]:
        return {"d": ["d"], "g": ["g"]}

    def optimizer_options(self) -> dict[str, dict]:
        # GANs train with little or no first-moment momentum (StyleGAN2's and DF-GAN's betas).
        return {"d": {"betas": (0.0, 0.99), "lr_scale": self.d_lr_scale}, "g": {"betas": (0.0, 0.99)}}

    def dataset(self) -> Dataset:
        return self.data

    def collate(self, items: list[dict]) -> dict:
        return {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
                "text": [item["text"] for item in items]}

    @torch.no_grad()
    def text_features(self, texts: list[str], device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sentence, words, word_mask) for `texts`; each caption is encoded once, in float32."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            if len(self._text_cache) + len(missing) > MAX_CACHED_CAPTIONS:
                self._text_cache.clear()
            self.text_encoder.to(device)
            tokens = self.tokenizer(missing, padding="longest", truncation=True, return_tensors="pt")
            with torch.autocast(device.type, enabled=False):
                out = self.text_encoder(tokens.input_ids.to(device))
            lengths = tokens.attention_mask.sum(dim=1).tolist()
            for text, pooled, hidden, length in zip(missing, out.pooler_output, out.last_hidden_state, lengths):
                self._text_cache[text] = (pooled.float(), hidden[:length].float())
        sentence = torch.stack([self._text_cache[t][0] for t in texts])
        words = nn.utils.rnn.pad_sequence([self._text_cache[t][1] for t in texts], batch_first=True)
        lengths = torch.tensor([len(self._text_cache[t][1]) for t in texts], device=device)
        mask = torch.arange(words.shape[1], device=device)[None, :] < lengths[:, None]
        return sentence, words, mask

    @torch.no_grad()
    def clip_text_embeds(self, texts: list[str], device: torch.device) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self._clip_text_cache))
        if missing:
            if len(self._clip_text_cache) + len(missing) > MAX_CACHED_CAPTIONS:
                self._clip_text_cache.clear()
            self.clip.to(device)
            tokens = self.tokenizer(missing, padding="longest", truncation=True, return_tensors="pt")
            with torch.autocast(device.type, enabled=False):
                embeds = self.clip.get_text_features(input_ids=tokens.input_ids.to(device),
                                                     attention_mask=tokens.attention_mask.to(device))
            embeds = getattr(embeds, "pooler_output", embeds)
            self._clip_text_cache.update(zip(missing, embeds.float()))
        return torch.stack([self._clip_text_cache[t] for t in texts])

    def caption_bank(self, device: torch.device) -> tuple[dict[str, int], torch.Tensor]:
        """The CLIP text embeddings of the data set's distinct captions (the first MAX_CACHED_CAPTIONS), made once."""
        if self._caption_bank is None:
            captions = self.data.captions() if hasattr(self.data, "captions") else (
                self.data[i]["text"] for i in range(len(self.data)))
            distinct: dict[str, int] = {}
            for caption in captions:
                if caption not in distinct:
                    distinct[caption] = len(distinct)
                    if len(distinct) == MAX_CACHED_CAPTIONS:
                        break
            texts = list(distinct)
            embeds = torch.cat([self.clip_text_embeds(texts[i:i + 256], device) for i in range(0, len(texts), 256)])
            self._caption_bank = distinct, embeds
        return self._caption_bank

    def loss(self, optimizer: str, modules: dict[str, nn.Module], batch: dict, generator: torch.Generator):
        images, texts = batch["pixel_values"], batch["text"]
        device, n = images.device, len(texts)
        sentence, words, mask = self.text_features(texts, device)
        z = torch.randn(n, self.generator.config.z_dim, generator=generator, device=generator.device).to(device)
        if optimizer == "g":
            fake = modules["g"](z, sentence, words, mask)
            conditions = [sentence]
            if self.near_miss_weight > 0:
                near_texts, near_valid = mismatched_captions(texts, 1.0, generator)
                conditions.append(self.text_features(near_texts, device)[0])
            logits = modules["d"](torch.cat([fake] * len(conditions)), torch.cat(conditions)).float().split(n)
            fake_logits = logits[0]
            loss, metrics = generator_loss(fake_logits, self.loss_kind), {"fake_logit": fake_logits.detach().mean()}
            if self.near_miss_weight > 0:
                margin = fake_logits - logits[-1]
                loss = loss + self.near_miss_weight * _masked_mean(F.softplus(-margin), near_valid.to(device))
                metrics["near_miss_margin"] = _masked_mean(margin.detach(), near_valid.to(device))
            if self.clip is not None:
                if self.clip.device != device:  # the frozen CLIP is no module of the loop's: nothing else moves it
                    self.clip.to(device)
                side = self.clip.config.vision_config.image_size
                pixels = fake if fake.shape[-1] == side else F.interpolate(fake, size=(side, side), mode="bilinear")
                image_embeds = self.clip.get_image_features(pixel_values=pixels)
                image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
                text_embeds = self.clip_text_embeds(texts, device)
                term = clip_loss(image_embeds, text_embeds)
                loss = loss + self.clip_weight * term
                metrics["clip_similarity"] = 1 - term.detach()
                if self.clip_contrast > 0:
                    index, bank = self.caption_bank(device)
                    own = torch.tensor([index.get(t, -1) for t in texts], device=device)
                    same = own[:, None] == torch.arange(len(bank), device=device)[None, :]
                    contrast = clip_contrastive_loss(image_embeds, text_embeds, bank, same,
                                                     self.clip.logit_scale.exp())
                    loss = loss + self.clip_contrast * contrast
                    metrics["clip_contrast"] = contrast.detach()
            return loss, metrics

        with torch.no_grad():
            fake = modules["g"](z, sentence, words, mask)
        wrong_texts, valid = mismatched_captions(texts, self.mismatch_share, generator)
        wrong_sentence = self.text_features(wrong_texts, device)[0]
        lazy_r1 = float(torch.rand((), generator=generator, device=generator.device)) < 1 / self.r1_every
        with_r1 = self.r1_gamma > 0 and lazy_r1
        real = images.detach().requires_grad_(with_r1)
        # One D call on [real | real with another caption | fake]: DDP expects one forward per backward.
        fake = fake.to(images.dtype)
        logits = modules["d"](torch.cat([real, images, fake]), torch.cat([sentence, wrong_sentence, sentence]))
        real_logits, mismatched_logits, fake_logits = logits.float().split(n)
        loss = discriminator_loss(real_logits, fake_logits, mismatched_logits, valid.to(device), self.loss_kind)
        metrics = {"accuracy": ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2,
                   "mismatch_accuracy": _masked_mean((mismatched_logits < 0).float(), valid.to(device)),
                   "real_logit": real_logits.detach().mean(), "fake_logit": fake_logits.detach().mean()}
        if with_r1:
            penalty = r1_penalty(real_logits, real, self.r1_gamma)
            loss = loss + self.r1_every * penalty
            metrics["r1"] = penalty.detach()
        if n > 1:
            diversity = pairwise_distance(fake) / pairwise_distance(images).clamp(min=1e-6)
            metrics["diversity"] = diversity
            self._watch_collapse(diversity)
        return loss, metrics

    def _watch_collapse(self, diversity: torch.Tensor) -> None:
        """Counts D calls; at the end of each interval of log_every steps, compares the mean diversity
        (averaged over processes, so every process takes the same decision) with the threshold."""
        self._d_calls += 1
        self._diversity.append(diversity)
        if len(self._diversity) < self.interval_calls:
            return
        mean = torch.stack(self._diversity).mean()
        self._diversity = []
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean)
            mean = mean / dist.get_world_size()
        value = mean.item()
        low = value < self.collapse_threshold and self._d_calls > self.collapse_after_calls
        self._low_intervals = self._low_intervals + 1 if low else 0
        if self._low_intervals >= self.collapse_patience:
            checkpoints = list_checkpoints(self.run_dir) if self.run_dir is not None else []
            where = (f"Last checkpoint: {checkpoints[-1]}; resume from it (--resume) with a lower lr or a larger "
                     "--r1-gamma," if checkpoints else "Start again with a lower lr or a larger --r1-gamma,")
            raise BrushworkError(
                f"The GAN's generator collapsed: its samples' diversity stayed below {self.collapse_threshold} "
                f"(now {value:.4f}; 1.0 = as varied as the real images) for {self._low_intervals} log intervals. "
                f"{where} or lower --collapse-threshold if the data set itself is this uniform.")

    def fingerprint(self) -> dict:
        return {"stage": self.name, "g": asdict(self.generator.config), "d": asdict(self.discriminator.config),
                "loss": self.loss_kind, "r1_gamma": self.r1_gamma, "r1_every": self.r1_every,
                "data_size": len(self.data), "clip_weight": self.clip_weight,
                "text_encoder": self.text_encoder.config.to_diff_dict()} | (
                    {"clip_contrast": self.clip_contrast} if self.clip_contrast else {}) | (
                    # the flag's old name, so that runs begun before the rename resume
                    {"hard_negatives": self.mismatch_share} if self.mismatch_share else {}) | (
                    {"near_miss_weight": self.near_miss_weight} if self.near_miss_weight else {})

    @torch.no_grad()
    def sample(self, modules: dict[str, nn.Module], step: int) -> Image.Image:
        """The first captions of the data set, two fixed seeds each (row 1: seed 0, row 2: seed 1)."""
        g = modules["g"]
        device = next(g.parameters()).device
        prompts = [self.data[i]["text"] for i in range(min(NUM_SAMPLES, len(self.data)))]
        images = gan_generate(g, self.text_encoder, self.tokenizer, prompts * 2,
                              [0] * len(prompts) + [1] * len(prompts), device)
        return image_grid(images, len(prompts))


# ---- entry point --------------------------------------------------------------------------------


# Deleted GAN terms (the README's measurements: none of them helped); a run that used one cannot resume.
REMOVED_TERMS = {"uncond_weight": "--uncond-weight", "recon_weight": "--recon-weight",
                 "patch_weight": "--patch-weight"}


def _check_folders(config: GanTrainConfig) -> None:
    if config.data is None or config.text_model is None or config.out is None:
        raise BrushworkError("--data, --model and --out are required, e.g. brushwork train gan --data shapes "
                             "--model my-model --out my-gan")
    text_model, out = resolve_model(config.text_model), Path(config.out)
    missing = [part for part in ("text_encoder", "tokenizer") if not (text_model / part).is_dir()]
    if missing:
        raise BrushworkError(f"{text_model} has no {', '.join(missing)}/: pass a model folder trained with "
                             "`brushwork train` or `brushwork train clip` as --model.")
    for flag, value in (("--clip-weight", config.clip_weight), ("--clip-contrast", config.clip_contrast),
                        ("--near-miss-weight", config.near_miss_weight)):
        if value < 0:
            raise BrushworkError(f"{flag} must be at least 0, got {value}.")
    if not 0 <= config.mismatch_share <= 1:
        raise BrushworkError(f"--mismatch-share is a share of the mismatched captions, from 0 to 1; got "
                             f"{config.mismatch_share}.")
    if config.lr_d is not None and config.lr_d <= 0:
        raise BrushworkError(f"--lr-d must be above 0, got {config.lr_d}.")
    if (config.clip_weight > 0 or config.clip_contrast > 0) and not (text_model / "clip").is_dir():
        option = "--clip-weight" if config.clip_weight > 0 else "--clip-contrast"
        raise BrushworkError(f"{option} needs a full CLIP model in {text_model / 'clip'} (what `brushwork "
                             "train` writes); this model folder has none.")
    if (out / "model_index.json").is_file():
        raise BrushworkError(f"{out} holds a diffusion model; choose a new folder for the GAN with --out.")
    if out.exists() and not out.is_dir():
        raise BrushworkError(f"output {out} is a file, not a folder: choose a folder path for --out.")


def init_checkpoint(path: Path) -> Path:
    """The checkpoint folder `path` names: a checkpoint itself, a run folder (its latest checkpoint) or a GAN
    folder written by `brushwork train gan` (the latest checkpoint of its run, OUT.runs/gan)."""
    path = Path(path).expanduser()
    for candidate in (path, runs_folder(path) / "gan"):
        if (candidate / "g.safetensors").is_file() and (candidate / "d.safetensors").is_file():
            return candidate
        checkpoints = list_checkpoints(candidate) if candidate.is_dir() else []
        if checkpoints:
            return checkpoints[-1]
    raise BrushworkError(f"--init {path}: no GAN checkpoint there (a folder with g.safetensors and d.safetensors, "
                         "a run folder with checkpoints/, or a GAN folder trained here).")


def load_init(generator: Generator, discriminator: Discriminator, checkpoint: Path) -> None:
    """G from the checkpoint's EMA weights (its raw ones when it kept no EMA), D from its weights. Other modules
    of the checkpoint (an old run's encoder or patch discriminator) are left out."""
    g_file = checkpoint / "ema-g.safetensors"
    g_file = g_file if g_file.is_file() else checkpoint / "g.safetensors"
    for module, file in ((generator, g_file), (discriminator, checkpoint / "d.safetensors")):
        try:
            load_model(module, str(file), strict=True)
        except Exception as error:  # safetensors raises its own types for corrupt files and wrong shapes
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BrushworkError(f"--init: {file} does not fit a GAN of this size and text encoder ({first}).") from None


def _check_resumable(run_dir: Path) -> None:
    """BrushworkError when the run to resume used a GAN term that no longer exists."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return
    try:
        fingerprint = json.loads((checkpoints[-1] / "state.json").read_text()).get("fingerprint", {})
    except (OSError, ValueError):  # damaged: the loop says so and resumes from the newest intact checkpoint
        return
    used = [flag for key, flag in REMOVED_TERMS.items() if fingerprint.get(key)]
    if used:
        raise BrushworkError(f"cannot resume {run_dir}: it trains with {', '.join(used)}, which brushwork no longer "
                             f"has (it never helped). Start a new run from its weights with --init {checkpoints[-1]}.")


def _init_facts(checkpoint: Path) -> dict:
    """Where the weights came from, and the commands and steps behind them when the GAN folder is known."""
    state = json.loads((checkpoint / "state.json").read_text()) if (checkpoint / "state.json").is_file() else {}
    facts = {"checkpoint": str(checkpoint), "steps": state.get("step"), "train_time_s": state.get("elapsed_s")}
    # OUT.runs/gan/checkpoints/step-N (or the older OUT/runs/gan/checkpoints/step-N) -> OUT/training.json
    runs = checkpoint.parents[2] if len(checkpoint.parents) > 2 else Path("/")
    model = runs.with_name(runs.name.removesuffix(".runs")) if runs.name.endswith(".runs") else runs.parent
    card = model / "training.json"
    if card.is_file():
        facts["commands"] = json.loads(card.read_text()).get("commands", [])
    return facts


def _model_card(facts: dict) -> str:
    # library_name "brushwork": diffusers cannot load a GAN folder; BrushworkPipeline.from_pretrained can.
    return front_matter(facts, library="brushwork", tags=["gan"], base_model=facts.get("base_model")) + f"""\
# brushwork GAN ({facts['size']})

A one-step text-to-image generator (a text-conditional GAN) trained with brushwork. `config.json` and
`model.safetensors` hold the generator (EMA weights); `text_encoder/` and `tokenizer/` are the frozen CLIP
text tower it is conditioned on. Steps, sampler and guidance do not apply to it.

- Commands, in order: {'; '.join(f'`{c}`' for c in facts['commands'])}
- Data: {data_line(facts)}
- Text encoder from: `{facts['text_model']}`
- Steps: {facts['steps']}{_init_line(facts)} (batch {facts['batch_size']}, lr {facts['lr']} (D: {facts['lr_d']}), \
{facts['loss']} loss, R1 γ {facts['r1_gamma']},
  CLIP term weight {facts['clip_weight']}, contrastive CLIP term weight {facts['clip_contrast']},
  near-miss share of D's mismatched captions {facts['mismatch_share']}, near-miss ranking weight \
{facts['near_miss_weight']})
- Parameters: G {facts['parameters']['g'] / 1e6:.2f}M, D {facts['parameters']['d'] / 1e6:.2f}M
- Train time: {facts['train_time_s'] / 60:.1f} min; finished {facts['finished']}
- Machine: {describe_machine(facts['machine'])}
"""


def _init_line(facts: dict) -> str:
    source = facts.get("initialized_from")
    if not source:
        return ""
    before = f"{source['steps']} steps" if source.get("steps") else "a checkpoint"
    return f", after {before} of {source['checkpoint']}"


def train_gan(config: GanTrainConfig, started: float | None = None) -> Path:
    """Train G and D on `config.data`, conditioned on the text encoder of `config.text_model`; write the GAN
    folder (config.json, model.safetensors, tokenizer/, text_encoder/, clip/ if present, README.md)."""
    command_started = time.time() if started is None else started   # when --max-minutes counts from
    size = gan_size(config.size)
    if config.loss not in LOSSES:
        raise BrushworkError(f"unknown GAN loss {config.loss!r}: choose one of {', '.join(LOSSES)}.")
    if config.r1_gamma < 0 or config.r1_every < 1 or config.collapse_patience < 1 or config.collapse_after < 0:
        raise BrushworkError("--r1-gamma and --collapse-after must be >= 0, --r1-every and --collapse-patience >= 1.")
    _check_folders(config)
    check_report_to(config.report_to)
    text_model, out = resolve_model(config.text_model), Path(config.out)
    tokenizer = CLIPTokenizer.from_pretrained(text_model / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(text_model / "text_encoder")
    text_dim = text_encoder.config.hidden_size
    generator, discriminator = (build_generator(config.size, text_dim, seed=config.seed),
                                build_discriminator(config.size, text_dim, seed=config.seed))
    init = init_checkpoint(config.init) if config.init is not None else None
    if init is not None:  # when --resume finds a checkpoint of its own, the loop loads that over these
        load_init(generator, discriminator, init)
    data = open_dataset(config.data, resolution=generator.config.resolution, n=config.n, seed=config.seed,
                        options=DataOptions(config.split, config.image_column, config.caption_column))
    if process_state().is_main_process:
        for line in report_lines(config.data, data):
            print(line)
    if config.mismatch_share > 0 or config.near_miss_weight > 0:
        require_near_misses(data.captions(), "--mismatch-share" if config.mismatch_share > 0 else "--near-miss-weight",
                            config.data)
    run_dir = Path(config.work) if config.work else runs_folder(out) / "gan"
    if config.resume:
        _check_resumable(run_dir)
    steps, batch_size = config.steps or size["steps"], config.batch_size or size["batch_size"]
    clip = load_clip(text_model / "clip") if config.clip_weight > 0 or config.clip_contrast > 0 else None
    stage = GanStage(data, generator, discriminator, text_encoder, tokenizer, loss=config.loss,
                     r1_gamma=config.r1_gamma, r1_every=config.r1_every, collapse_threshold=config.collapse_threshold,
                     collapse_patience=config.collapse_patience, collapse_after=config.collapse_after,
                     log_every=config.log_every, run_dir=run_dir, clip=clip, clip_weight=config.clip_weight,
                     d_lr_scale=(config.lr_d / config.lr) if config.lr_d is not None and config.lr > 0 else 1.0,
                     clip_contrast=config.clip_contrast, mismatch_share=config.mismatch_share,
                     near_miss_weight=config.near_miss_weight)
    started = time.time()
    result = run(stage, TrainConfig(
        out_dir=run_dir, max_steps=steps, batch_size=batch_size, lr=config.lr, mixed_precision=config.mixed_precision,
        ema_decay=config.ema_decay or None, grad_clip=10.0, checkpoint_every=config.checkpoint_every,
        log_every=config.log_every, sample_every=config.sample_every, seed=config.seed, resume=config.resume,
        num_workers=config.num_workers, stop_at=stop_time(command_started, config.max_minutes),
        report_to=config.report_to))
    if process_state().is_main_process:
        g = (result.ema or result.modules)["g"].to("cpu")
        save_generator(g, out)
        # The encoder G was trained with, saved from memory: the text model's folder may have changed since.
        text_encoder.save_pretrained(out / "text_encoder")
        tokenizer.save_pretrained(out / "tokenizer")
        if (text_model / "clip").is_dir():
            shutil.copytree(text_model / "clip", out / "clip", dirs_exist_ok=True)
        lines = result.log_path.read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
        previous = json.loads((out / "training.json").read_text()) if (out / "training.json").is_file() else {}
        init_facts = previous.get("initialized_from") if config.resume else None
        init_facts = init_facts or (_init_facts(init) if init is not None else None)
        # a resumed run continues its own card's list; one stopped before writing a card starts from --init's
        resumed_card = config.resume and "commands" in previous
        commands = previous["commands"] if resumed_card else list((init_facts or {}).get("commands", []))
        if config.command and config.command not in commands:
            commands.append(config.command)
        # the settings, then what they came to: steps done, the data's size, the defaults filled in
        base_model = card_name(str(config.init)) if config.init is not None else (
            previous.get("base_model") if config.resume else None)
        facts = {"kind": "gan", "commands": commands, **settings(config), "n": len(data),
                 "data_report": data_facts(data), "base_model": base_model,
                 "resolution": generator.config.resolution, "steps": result.step, "batch_size": batch_size,
                 "lr_d": config.lr_d or config.lr, "ema_decay": config.ema_decay or None,
                 "parameters": {"g": count_parameters(generator), "d": count_parameters(discriminator)},
                 "train_time_s": round(last.get("elapsed_s", 0.0), 1), "wall_time_s": round(time.time() - started, 1),
                 "finished": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_facts()}
        if init_facts:
            facts["initialized_from"] = {k: v for k, v in init_facts.items() if k != "commands"}
        (out / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
        (out / "README.md").write_text(_model_card(facts))
    process_state().wait_for_everyone()
    return out
