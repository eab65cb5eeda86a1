"""The three training stages of the recipe, as Stages for brushwork.train.loop.

- ClipStage: a CLIPModel trained contrastively on the data set's image–caption pairs. Its text tower
  becomes the generator's text encoder; its vision tower serves evaluation.
- VaeStage: an AutoencoderKL trained on reconstruction of random crops with a small KL term; afterwards
  `normalize_latents` makes its latents zero-mean and unit-variance per channel for the UNet.
- UnetStage: a UNet2DConditionModel trained to denoise latents, conditioned on the frozen text encoder,
  with caption dropout for classifier-free guidance and min-SNR loss weighting.

Images are tensors in [-1, 1] (the data contract); CLIP's vision tower reads them as they are.
"""

import copy
import math

import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, LCMScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from diffusers.training_utils import compute_snr
from diffusers.utils import make_image_grid
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from brushwork.data.captions import contradictions_by_direction_and_axis
from brushwork.errors import BrushworkError
from brushwork.generation.output import from_model_range, to_pil
from brushwork.train.attention_loss import RegionTargets, install_recorder
from brushwork.train.loop import BaseStage, process_state

NUM_VALIDATION = 8
# CLIP with near misses: the text tower keeps a caption and its near misses at most this cosine apart, with
# this weight on the hinge (0.8 and 5 measured here: the pair "above"/"below" fell from cosine 1.00 to 0.77).
NEAR_MISS_MARGIN = 0.8
NEAR_MISS_SEPARATION = 5.0
BETA_RANGES = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (0.0001, 0.02)}
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _unwrap(module: nn.Module) -> nn.Module:
    # DDP and torch.compile wrap the model; attributes and extra methods live on the inner one.
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    return to_pil(from_model_range(images.detach()))


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Images in rows of `columns` (every caller gives whole rows)."""
    return make_image_grid(images, rows=len(images) // columns, cols=columns)


def _validation_items(data: Dataset) -> list[dict]:
    return [data[i] for i in range(min(NUM_VALIDATION, len(data)))]


def noise_schedule(beta_schedule: str = "scaled_linear", prediction_type: str = "epsilon",
                   num_train_timesteps: int = 1000, zero_terminal_snr: bool = False) -> dict:
    """Scheduler kwargs shared by training (DDPMScheduler) and the saved pipeline (DPMSolverMultistepScheduler).

    zero_terminal_snr (Lin et al. 2024): the last training step is pure noise, as sampling starts. Without it
    the noisiest training input still holds about 7% of the image, so the UNet learns to read the layout from
    that leak rather than from the caption, and at sampling time places objects where the noise suggests."""
    if beta_schedule not in BETA_RANGES:
        raise BrushworkError(f"unknown noise schedule {beta_schedule!r}: choose one of {', '.join(BETA_RANGES)}.")
    if prediction_type not in PREDICTION_TYPES:
        raise BrushworkError(f"unknown prediction type {prediction_type!r}: choose one of {', '.join(PREDICTION_TYPES)}.")
    if zero_terminal_snr and prediction_type == "epsilon":
        raise BrushworkError("a zero terminal SNR needs v_prediction: at pure noise, the noise is the input itself "
                             "and predicting it teaches nothing (--prediction v_prediction).")
    beta_start, beta_end = BETA_RANGES[beta_schedule]
    schedule = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                    beta_schedule=beta_schedule, prediction_type=prediction_type)
    if zero_terminal_snr:   # sampling must then start at the last step: trailing spacing
        schedule.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return schedule


def inference_scheduler(schedule: dict) -> DPMSolverMultistepScheduler:
    # steps_offset=1 is what StableDiffusionPipeline expects (it rewrites and warns otherwise). The saved config
    # also holds SD's values of DDIM's settings, so that DDIMScheduler.from_config(it) does not take its
    # defaults: clip_sample=True clips latents to [-1, 1] and ruins every image of a latent model.
    scheduler = DPMSolverMultistepScheduler(**schedule, steps_offset=1)
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)
    return scheduler


def lcm_scheduler(scheduler_config: dict, solver_steps: int) -> LCMScheduler:
    """The teacher's noise schedule and prediction type as an LCMScheduler whose grid is the solver's. Only
    LCMScheduler's own settings are kept: the teacher's sampler-specific ones would be saved too, and every load of
    the folder would warn about them."""
    own, _, _ = LCMScheduler.extract_init_dict(dict(scheduler_config))
    return LCMScheduler(**{**own, "original_inference_steps": solver_steps, "timestep_scaling": 10.0,
                           "clip_sample": False})


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """CLIP's text tower as a standalone CLIPTextModel (a copy), as diffusers' pipelines load it."""
    if isinstance(clip.text_model, CLIPTextModel):   # transformers >= 5
        return copy.deepcopy(clip.text_model)
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.text_model.load_state_dict(clip.text_model.state_dict())
    return text_encoder


def near_miss_texts(texts: list[str], share: float, generator: torch.Generator) -> tuple[list[str], list[int]]:
    """For a share of the captions (those in the shapes grammar), one near miss per kind of change (shape,
    colour, size, count, the relation's direction, its axis; brushwork.data.captions.
    contradictions_by_direction_and_axis), drawn with `generator`: (near misses, index of the caption each
    belongs to)."""
    if share <= 0:
        return [], []
    draws = torch.rand(len(texts), generator=generator, device=generator.device).tolist()
    near_misses, owners = [], []
    for i, (text, draw) in enumerate(zip(texts, draws)):
        if draw >= share:
            continue
        for captions in contradictions_by_direction_and_axis(text).values():
            pick = int(torch.randint(len(captions), (1,), generator=generator, device=generator.device))
            near_misses.append(captions[pick])
            owners.append(i)
    return near_misses, owners


class ClipStage(BaseStage):
    """Symmetric InfoNCE on (image, caption) pairs with CLIP's learned temperature, clamped at 100.

    Captions repeat in captioned data sets (every red circle is "a red circle"), so pairs in a batch
    that share a caption are all positives: the target spreads evenly over them instead of treating
    identical captions as negatives.

    With `hard_negatives` > 0 (shapes captions only), that share of the images also meets one near miss of
    its caption per kind of change (near_miss_texts: the relation's direction and its axis count as two kinds)
    among the captions it must not pick, as NegCLIP does, and the text tower is asked to keep each near miss's
    embedding apart from its caption's (cosine at most NEAR_MISS_MARGIN). Without both, nothing keeps "above"
    from "below": the batch's other captions almost always differ in colour, the vision tower does not learn
    relations, and the text tower learns to ignore the word. The `shapes` text encoder shipped until
    2026-11-29 so gave "a red circle above a blue square" and "... below ..." pooled features 0.10 apart,
    against 17 for another colour. Near misses alone (NegCLIP) did not change that here: the image side stays
    blind while the text side is, and the other way round; the text-side term breaks the tie.
    """

    name = "clip"

    def __init__(self, data: Dataset, tokenizer: CLIPTokenizer, clip: CLIPModel, max_logit_scale: float = 100.0,
                 hard_negatives: float = 0.0):
        if not 0 <= hard_negatives <= 1:
            raise BrushworkError(f"the share of images with near-miss captions must be in [0, 1], got {hard_negatives}.")
        self.data = data
        self.tokenizer = tokenizer
        self.clip = clip
        self.max_logit_scale = max_logit_scale
        self.hard_negatives = hard_negatives

    def modules(self) -> dict[str, nn.Module]:
        return {"clip": self.clip}

    def dataset(self) -> Dataset:
        return self.data

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        texts = [item["text"] for item in items]
        # Pad to the longest caption: under CLIP's causal mask the pooled (end-token) feature ignores padding.
        tokens = self.tokenizer(texts, padding="longest", truncation=True, return_tensors="pt")
        first_index = {}
        caption_group = torch.tensor([first_index.setdefault(t, i) for i, t in enumerate(texts)])
        return {"input_ids": tokens.input_ids, "pixel_values": torch.stack([item["pixel_values"] for item in items]),
                "caption_group": caption_group, "texts": texts}

    def loss(self, optimizer: str, modules: dict[str, nn.Module], batch: dict, generator: torch.Generator):
        clip = modules["clip"]
        with torch.no_grad():
            _unwrap(clip).logit_scale.clamp_(0, math.log(self.max_logit_scale))
        texts, input_ids = batch["texts"], batch["input_ids"]
        near_misses, owners = near_miss_texts(texts, self.hard_negatives, generator)
        if near_misses:  # the batch's captions, then the near misses: columns 0..B-1 stay the batch's
            tokens = self.tokenizer(texts + near_misses, padding="longest", truncation=True, return_tensors="pt")
            input_ids = tokens.input_ids.to(input_ids.device)
        output = clip(input_ids=input_ids, pixel_values=batch["pixel_values"])
        logits = output.logits_per_image.float()
        group = batch["caption_group"]
        targets = (group[:, None] == group[None, :]).float()
        targets = targets / targets.sum(dim=1, keepdim=True)
        batch_logits = logits[:, : len(texts)]
        # image -> caption over every caption (a near miss is never the image's own: it contradicts it)
        image_targets = F.pad(targets, (0, len(near_misses)))
        loss = (F.cross_entropy(logits, image_targets) + F.cross_entropy(batch_logits.T, targets)) / 2
        accuracy = targets.gather(1, batch_logits.T.argmax(dim=1, keepdim=True)).gt(0).float().mean()
        metrics = {"accuracy": accuracy, "logit_scale": _unwrap(clip).logit_scale.detach().exp()}
        if near_misses:
            owners = torch.tensor(owners, device=logits.device)
            columns = len(texts) + torch.arange(len(owners), device=logits.device)
            text_embeds = output.text_embeds.float()   # unit length
            cosine = (text_embeds[owners] * text_embeds[columns]).sum(dim=1)
            loss = loss + NEAR_MISS_SEPARATION * F.relu(cosine - NEAR_MISS_MARGIN).mean()
            # how often an image scores its own caption above a near miss of it
            metrics["near_miss_accuracy"] = (logits[owners, owners] > logits[owners, columns]).float().mean()
            metrics["near_miss_cosine"] = cosine.detach().mean()
        return loss, metrics

    def fingerprint(self) -> dict:
        return {"stage": self.name, "clip": self.clip.config.to_diff_dict(), "max_logit_scale": self.max_logit_scale,
                "vocab_size": len(self.tokenizer), "data_size": len(self.data)} | (
                    {"hard_negatives": self.hard_negatives} if self.hard_negatives else {})

    @torch.no_grad()
    def sample(self, modules: dict[str, nn.Module], step: int) -> Image.Image:
        """Validation images on top, under them the caption-to-image probability matrix (rows: captions)."""
        clip = _unwrap(modules["clip"])
        items = _validation_items(self.data)
        batch = self.collate(items)
        device = next(clip.parameters()).device
        was_training = clip.training
        clip.eval()
        logits = clip(input_ids=batch["input_ids"].to(device),
                      pixel_values=batch["pixel_values"].to(device)).logits_per_text
        clip.train(was_training)
        images = _to_pil(batch["pixel_values"])
        cell = images[0].width
        probabilities = logits.float().softmax(dim=1).cpu().numpy()
        heatmap = Image.fromarray((probabilities * 255).round().astype("uint8")).convert("RGB")
        heatmap = heatmap.resize((cell * len(items), cell * len(items)), Image.NEAREST)
        grid = Image.new("RGB", (heatmap.width, cell + heatmap.height), "white")
        grid.paste(image_grid(images, len(images)), (0, 0))
        grid.paste(heatmap, (0, cell))
        return grid


class _VaeWithKL(nn.Module):
    """An AutoencoderKL whose forward returns the reconstruction and the KL term: under DDP, gradients are
    synchronised only for work done through forward, so encode + sample + decode must happen in one."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * _randn(posterior.mean.shape, generator, images.device)
        return self.vae.decode(latents).sample, posterior.kl()


class VaeStage(BaseStage):
    """Reconstruction (L1 or MSE, per pixel) plus `kl_weight` × KL per pixel. `self.vae` is trained in place."""

    name = "vae"

    def __init__(self, data: Dataset, vae: AutoencoderKL, reconstruction: str = "l1", kl_weight: float = 1e-6,
                 crop: int | None = None):
        if reconstruction not in ("l1", "mse"):
            raise BrushworkError(f"unknown VAE reconstruction loss {reconstruction!r}: choose l1 or mse.")
        self.data = data
        self.vae = vae
        self.trainable = _VaeWithKL(vae)
        self.reconstruction = reconstruction
        self.kl_weight = kl_weight
        self.crop = crop   # train on random crops of this side (None: whole images); it reconstructs whole ones after

    def modules(self) -> dict[str, nn.Module]:
        return {"vae": self.trainable}

    def dataset(self) -> Dataset:
        return self.data

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([item["pixel_values"] for item in items])}

    def loss(self, optimizer: str, modules: dict[str, nn.Module], batch: dict, generator: torch.Generator):
        images = batch["pixel_values"]
        if self.crop is not None and self.crop < images.shape[-1]:
            images = random_crops(images, self.crop, generator)
        reconstruction, kl = modules["vae"](images, generator)
        if self.reconstruction == "l1":
            reconstruction_loss = F.l1_loss(reconstruction.float(), images.float())
        else:
            reconstruction_loss = F.mse_loss(reconstruction.float(), images.float())
        kl = kl.float().mean() / images[0].numel()
        loss = reconstruction_loss + self.kl_weight * kl
        return loss, {"reconstruction": reconstruction_loss.detach(), "kl": kl.detach()}

    def fingerprint(self) -> dict:
        return {"stage": self.name, "vae": dict(self.vae.config), "reconstruction": self.reconstruction,
                "kl_weight": self.kl_weight, "crop": self.crop, "data_size": len(self.data)}

    @torch.no_grad()
    def sample(self, modules: dict[str, nn.Module], step: int) -> Image.Image:
        """Validation images on top, their reconstructions (posterior mean) under them."""
        vae = _unwrap(modules["vae"]).vae
        images = torch.stack([item["pixel_values"] for item in _validation_items(self.data)])
        images = images.to(next(vae.parameters()).device)
        reconstructions = vae.decode(vae.encode(images).latent_dist.mode()).sample
        return image_grid(_to_pil(images) + _to_pil(reconstructions), len(images))


@torch.no_grad()
def normalize_latents(vae: AutoencoderKL, data: Dataset, num_samples: int = 512, batch_size: int = 64) -> dict:
    """Make the VAE's latents zero-mean, unit-variance per channel, with scaling_factor 1.

    A small VAE trained on mostly-white images gives channels with very different means and spreads
    (measured: means -1.4..0.7, stds 0.28..1.1 after SD's single global scale), so noise drowns the
    low-spread channels — where colour lives — long before the others. The per-channel affine is folded
    into the 1×1 quant_conv (encoder side) and post_quant_conv (decoder side), so decode(encode(x)) is
    unchanged and the folder stays a plain AutoencoderKL that any diffusers pipeline uses as is.
    Measured on the posterior means of the first `num_samples` items, which is what UnetStage trains on.
    """
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise BrushworkError("normalize_latents needs a VAE with quant_conv and post_quant_conv")
    device = next(vae.parameters()).device
    indices = range(min(num_samples, len(data)))
    loader = DataLoader(torch.utils.data.Subset(data, indices), batch_size=batch_size,
                        collate_fn=lambda items: torch.stack([item["pixel_values"] for item in items]))
    latents = torch.cat([vae.encode(images.to(device)).latent_dist.mode() for images in loader]).double()
    mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3)).clamp_min(1e-6)
    channels = len(mean)
    quant, post = vae.quant_conv, vae.post_quant_conv
    # quant_conv outputs [mean, logvar]: z' = (z - mean_c) / std_c, logvar' = logvar - 2 log std_c.
    weight, bias = quant.weight.double(), quant.bias.double()
    weight[:channels] /= std[:, None, None, None]
    bias[:channels] = (bias[:channels] - mean) / std
    bias[channels:] -= 2 * std.log()
    quant.weight.copy_(weight)
    quant.bias.copy_(bias)
    # post_quant_conv reads z = std_c z' + mean_c.
    weight, bias = post.weight.double(), post.bias.double()
    post.bias.copy_(bias + weight[:, :, 0, 0] @ mean)
    post.weight.copy_(weight * std[None, :, None, None])
    vae.register_to_config(scaling_factor=1.0)   # encode() returns unscaled latents; they are now the scaled ones
    return {"mean": mean.tolist(), "std": std.tolist()}


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One square crop of side `size` per image, at a place drawn from `generator` (so resume repeats it)."""
    n, _, height, width = images.shape
    top = torch.randint(0, height - size + 1, (n,), generator=generator, device=generator.device).tolist()
    left = torch.randint(0, width - size + 1, (n,), generator=generator, device=generator.device).tolist()
    return torch.stack([image[:, y:y + size, x:x + size] for image, y, x in zip(images, top, left)])


def _randn(shape, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


class _LatentCache(Dataset):
    """The data set, with each item's latents kept once they are encoded. An item is rendered and encoded the
    first time a batch draws it (in the training step: `LatentTextStage.batch_latents`) and read from memory
    after that, so a run that stops before an epoch encodes only what it draws, and none of its time budget is
    spent encoding up front. An item's latents do not depend on the batch they are encoded in (measured on CPU:
    bit-equal), so a resumed run, whose cache starts empty, trains exactly as an uninterrupted one.

    Data loader workers hold copies made when they start: they render items the main process may have cached
    since, which the step then reads from the cache."""

    def __init__(self, data: Dataset):
        self.data = data
        self.encoded = torch.zeros(len(data), dtype=torch.bool)
        self.latents: torch.Tensor | None = None     # [items, channels, h, w] fp16, allocated at the first store
        self.texts: dict[int, str] = {}
        self.regions: dict[int, list[dict] | None] = {}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        if self.encoded[i]:
            return {"index": i, "text": self.texts[i], "regions": self.regions[i]}
        item = self.data[i]
        return {"index": i, "pixel_values": item["pixel_values"], "text": item["text"], "regions": item.get("regions")}

    def store(self, indices: list[int], latents: torch.Tensor, texts: list[str], regions: list) -> None:
        if self.latents is None:
            self.latents = torch.empty(len(self), *latents.shape[1:], dtype=torch.float16)
        # fp16 halves the memory of the cache; latents are unit scale, well inside its range.
        self.latents[indices] = latents.half().cpu()
        self.encoded[indices] = True
        self.texts.update(zip(indices, texts))
        self.regions.update(zip(indices, regions))


class LatentTextStage(BaseStage):
    """What the stages that train a UNet on latents share (UnetStage, train/distill.py's DistillStage): the frozen
    text encoder and VAE, and their outputs cached.

    Latents are cached per item as batches first draw them (when `cache_latents` and the set has at most
    `max_cached_latents` items: see _LatentCache), text embeddings per unique caption (captions repeat).
    """

    def __init__(self, data: Dataset, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, vae: AutoencoderKL,
                 cache_latents: bool = True, max_cached_latents: int = 200_000):
        self.data = data
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.vae = vae.requires_grad_(False).eval()
        self.cache = _LatentCache(data) if cache_latents and len(data) <= max_cached_latents else None
        self._text_cache: dict[str, torch.Tensor] = {}

    def dataset(self) -> Dataset:
        return self.data if self.cache is None else self.cache

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.vae.parameters()).device
        with torch.autocast(device.type, enabled=False):
            latents = self.vae.encode(images.to(device)).latent_dist.mode()
        return latents * self.vae.config.scaling_factor

    def collate(self, items: list[dict]) -> dict:
        batch = {"text": [item["text"] for item in items], "regions": [item.get("regions") for item in items]}
        pixels = [item["pixel_values"] for item in items if "pixel_values" in item]
        batch["pixel_values"] = torch.stack(pixels) if pixels else None
        if "index" in items[0]:   # from the latent cache: items not cached yet come with their pixels
            batch["index"] = [item["index"] for item in items]
            batch["rendered"] = [position for position, item in enumerate(items) if "pixel_values" in item]
        return batch

    def batch_latents(self, batch: dict) -> torch.Tensor:
        """The batch's scaled latents in float32: from the cache, after encoding and storing the items not in it
        yet; or, without a cache, encoded now."""
        device = process_state().device
        if "index" not in batch:
            with torch.no_grad():
                self.vae.to(device)
                return self._encode_images(batch["pixel_values"].to(device)).float()
        indices, rendered = batch["index"], batch["rendered"]
        new = [row for row, position in enumerate(rendered) if not self.cache.encoded[indices[position]]]
        if new:
            positions = [rendered[row] for row in new]
            with torch.no_grad():
                self.vae.to(device)
                latents = self._encode_images(batch["pixel_values"][new].to(device))
            self.cache.store([indices[p] for p in positions], latents, [batch["text"][p] for p in positions],
                             [batch["regions"][p] for p in positions])
        return self.cache.latents[indices].to(device).float()

    @torch.no_grad()
    def text_embeddings(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """Hidden states of the text encoder for each caption, as the pipeline computes them (padded to 77
        tokens, no attention mask), cached per caption."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            self.text_encoder.to(device)
            tokens = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt")
            # Full precision whatever the loop's autocast: the cache outlives the step that filled it.
            with torch.autocast(device.type, enabled=False):
                hidden = self.text_encoder(tokens.input_ids.to(device))[0]
            self._text_cache.update(zip(missing, hidden))
        return torch.stack([self._text_cache[t] for t in texts])


class UnetStage(LatentTextStage):
    """Denoising on VAE latents, conditioned on the frozen text encoder's hidden states (both cached: see
    LatentTextStage). A fraction `caption_dropout` of captions is replaced by the empty caption, which teaches the
    unconditional prediction that classifier-free guidance needs. With `attention_loss` > 0 and object regions in
    the data, the cross-attention of each object's words is also asked to fall inside its region
    (train/attention_loss.py).
    """

    name = "unet"

    def __init__(self, data: Dataset, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, vae: AutoencoderKL, beta_schedule: str = "scaled_linear",
                 prediction_type: str = "epsilon", zero_terminal_snr: bool = False, snr_gamma: float | None = 5.0,
                 caption_dropout: float = 0.1, cache_latents: bool = True, max_cached_latents: int = 200_000, guidance_scale: float = 4.0,
                 sample_steps: int = 20, validation_prompts: list[str] | None = None, attention_loss: float = 0.0):
        super().__init__(data, text_encoder, tokenizer, vae, cache_latents, max_cached_latents)
        self.unet = unet
        self.schedule = noise_schedule(beta_schedule, prediction_type, zero_terminal_snr=zero_terminal_snr)
        self.noise_scheduler = DDPMScheduler(**self.schedule)
        self.snr_gamma = snr_gamma
        self.caption_dropout = caption_dropout
        self.guidance_scale = guidance_scale
        self.sample_steps = sample_steps
        self.validation_prompts = validation_prompts  # the sample grids' prompts; None: the first captions
        self.attention_loss = attention_loss
        self._recorder = install_recorder(unet) if attention_loss > 0 else None

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def loss(self, optimizer: str, modules: dict[str, nn.Module], batch: dict, generator: torch.Generator):
        unet = modules["unet"]
        latents = self.batch_latents(batch)
        device, batch_size = latents.device, latents.shape[0]
        noise = _randn(latents.shape, generator, device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch_size,),
                                  generator=generator, device=generator.device).to(device)
        dropped = (torch.rand(batch_size, generator=generator, device=generator.device) < self.caption_dropout).tolist()
        texts = ["" if drop else text for text, drop in zip(batch["text"], dropped)]
        hidden = self.text_embeddings(texts, device)

        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.schedule["prediction_type"] == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        regions = None
        if self._recorder is not None:
            regions = RegionTargets(self.tokenizer, texts, batch.get("regions") or [None] * batch_size,
                                    hidden.shape[1])
            self._recorder.maps.clear()
            self._recorder.recording = regions.any()
        try:
            prediction = unet(noisy, timesteps, hidden).sample.float()
        finally:
            if self._recorder is not None:
                self._recorder.recording = False
        per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * self.loss_weights(timesteps)).mean()
        logs = {"mse": per_sample.detach().mean()}
        if regions is not None and self._recorder.maps:
            attention = regions.loss(self._recorder.maps)
            self._recorder.maps.clear()
            loss = loss + self.attention_loss * attention
            logs["attention"] = attention.detach()
        return loss, logs

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ weighting (Hang et al. 2023): min(SNR, γ)/SNR for ε; for v, min(SNR+1, γ)/(SNR+1), which
        caps the easy low-noise steps the same way but keeps weight 1 at pure noise (SNR 0), where v is the
        image itself: min(SNR, γ)/(SNR+1) would give the step that sets the layout no weight at all."""
        if self.snr_gamma is None:
            return torch.ones(len(timesteps), device=timesteps.device)
        snr = compute_snr(self.noise_scheduler, timesteps)
        if self.schedule["prediction_type"] == "epsilon":
            return snr.clamp(max=self.snr_gamma) / snr
        return (snr + 1).clamp(max=self.snr_gamma) / (snr + 1)

    def fingerprint(self) -> dict:
        return {"stage": self.name, "unet": dict(self.unet.config), "schedule": self.schedule,
                "snr_gamma": self.snr_gamma, "caption_dropout": self.caption_dropout,
                **({"attention_loss": self.attention_loss} if self.attention_loss else {}),
                "scaling_factor": self.vae.config.scaling_factor, "data_size": len(self.data)}

    def pipeline(self, unet: UNet2DConditionModel) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=unet, scheduler=inference_scheduler(self.schedule), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    @torch.no_grad()
    def sample(self, modules: dict[str, nn.Module], step: int) -> Image.Image:
        """The validation prompts (or the first captions of the data set), one fixed seed each."""
        unet = _unwrap(modules["unet"])
        device = next(unet.parameters()).device
        pipe = self.pipeline(unet).to(device)
        pipe.set_progress_bar_config(disable=True)
        prompts = self.validation_prompts or [item["text"] for item in _validation_items(self.data)]
        generators = [torch.Generator(device).manual_seed(seed) for seed in range(len(prompts))]
        was_training = unet.training
        unet.eval()
        images = pipe(prompts, num_inference_steps=self.sample_steps, guidance_scale=self.guidance_scale,
                      generator=generators).images
        unet.train(was_training)
        return image_grid(images, len(images))
