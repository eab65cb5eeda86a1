"""Text-to-image generation: load a model (folder or single SD file), pick a sampler by name, sample.

BrushworkPipeline does the user-facing work (checking arguments, seeds, prompt batches, output
formats); the model behind it does the sampling. Today that model is always a DiffusionModel (text
encoder + UNet + VAE, sampled by a diffusers scheduler); `load_model` picks the kind from the folder so
other kinds (e.g. a one-step generator with its own config.json) can sit behind the same call.
"""

import hashlib
import inspect
import json
import math
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import safetensors.torch
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
)
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from brushwork import __version__
from brushwork.errors import BrushworkError
from brushwork.eval.features import ClipEmbedder
from brushwork.hardware import CompiledModule, cpu_has_native_bf16
from brushwork.layout import (
    REGIONAL_UNTIL,
    START,
    Region,
    plan_layout,
    region_masks,
    sketch,
)
from brushwork.models.gan import GanModel, is_gan_folder, text_encoder_folder
from brushwork.models.loading import load_pretrained

ASSETS_DIR = Path(__file__).parent / "assets"
SHIPPED_MODELS_DIR = ASSETS_DIR / "models"
DEFAULT_MODEL = "shapes"
SD_CONFIG_DIR = ASSETS_DIR / "sd_configs"
CLIP_TOKENIZER_DIR = SD_CONFIG_DIR / "clip-tokenizer"

MAX_IMAGES = 64
MAX_SIDE = 2048
MAX_BEST_OF = 16
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

SAMPLERS = {
    "dpm++": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
}
DEFAULT_SAMPLER = "dpm++"
# AUTOMATIC1111's sampler names, written into PNG info and accepted back.
A1111_SAMPLER_NAMES = {"dpm++": "DPM++ 2M", "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun"}
_SAMPLER_ALIASES = {
    **{a1111.lower(): name for name, a1111 in A1111_SAMPLER_NAMES.items()},
    "dpm++2m": "dpm++", "dpmpp_2m": "dpm++", "dpmsolver++": "dpm++", "dpm": "dpm++",
    "euler-a": "euler_a", "euler ancestral": "euler_a", "k_euler_a": "euler_a", "k_euler": "euler",
    "k_heun": "heun",
}


def resolve_sampler(name: str | None) -> str:
    """Canonical sampler name ("dpm++", "ddim", ...) for a brushwork or AUTOMATIC1111 name."""
    if name is None:
        return DEFAULT_SAMPLER
    key = name.strip().lower()
    key = _SAMPLER_ALIASES.get(key, key)
    if key not in SAMPLERS:
        known = ", ".join(f"{n} ({A1111_SAMPLER_NAMES[n]})" for n in SAMPLERS)
        raise BrushworkError(f"unknown sampler '{name}'; known samplers: {known}")
    return key


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class GenerationCancelled(Exception):
    """Raised when callback_on_step_end asks to stop (returns {"cancel": True}) or raises it itself."""


@dataclass
class GenerationOutput:
    images: list  # PIL images, or arrays/tensors for output_type "np"/"pt"
    prompts: list[str]  # one per image
    negative_prompts: list[str]  # one per image
    seeds: list[int | None]  # one per image; None where a caller-made torch.Generator was used
    num_inference_steps: int
    guidance_scale: float
    sampler: str
    height: int
    width: int
    model_name: str
    model_hash: str
    extra: dict = field(default_factory=dict)
    one_step: bool = False  # a GAN's images: one step, no sampler, no guidance

    def parameters(self, index: int) -> dict[str, Any]:
        """The generation parameters of image `index`, as pnginfo.format_parameters takes them (a one-step
        model's images record Steps: 1 and leave out the sampler and CFG scale they did not use)."""
        return {
            "prompt": self.prompts[index],
            "negative_prompt": self.negative_prompts[index],
            "steps": 1 if self.one_step else self.num_inference_steps,
            "sampler": None if self.one_step else A1111_SAMPLER_NAMES[self.sampler],
            "cfg_scale": None if self.one_step else self.guidance_scale,
            "seed": self.seeds[index],
            "width": self.width,
            "height": self.height,
            "model_hash": self.model_hash,
            "model": self.model_name,
            "version": f"brushwork {__version__}",
            **self.extra,
        }


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, heads * d] -> [B, heads, T, d]"""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _project_text(attn: Attention, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of cross-attention `attn` for `text`, split into heads."""
    if attn.fused_projections:
        key, value = attn.to_kv(text).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(text), attn.to_v(text)
    return _split_heads(key, attn.heads), _split_heads(value, attn.heads)


class TextKVAttnProcessor:
    """Attention as diffusers' AttnProcessor2_0 computes it in SD UNets, except that cross-attention takes the
    keys and values of the text ready-made (in `text_kv`, at `index`): the text is the same at every sampling
    step, so they are projected once per image instead of once per step (8-13% of a compiled UNet call here).
    Written by hand because diffusers has no processor that takes precomputed keys and values."""

    def __init__(self, index: int | None):
        self.index = index

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 text_kv: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("TextKVAttnProcessor does not take attention masks")
        if encoder_hidden_states is None:
            if attn.fused_projections:
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            key, value = _split_heads(key, attn.heads), _split_heads(value, attn.heads)
        elif text_kv:
            query = attn.to_q(hidden_states)
            key, value = text_kv[2 * self.index], text_kv[2 * self.index + 1]
        else:  # the UNet called directly, without Denoiser
            query = attn.to_q(hidden_states)
            key, value = _project_text(attn, encoder_hidden_states)
        query = _split_heads(query, attn.heads)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _plain_attention(attn: Attention) -> bool:
    """Attention that TextKVAttnProcessor computes exactly as diffusers does (that of every SD 1.x/2.x UNet)."""
    return (type(attn.processor) in (AttnProcessor2_0, FusedAttnProcessor2_0, TextKVAttnProcessor)
            and attn.spatial_norm is None and attn.group_norm is None and attn.norm_cross is None
            and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection
            and attn.rescale_output_factor == 1.0)


def _unsupported_conditioning(unet: UNet2DConditionModel) -> str | None:
    """What this UNet needs beyond latents, timestep and text (which is all a text-to-image pipeline gives)."""
    c = unet.config
    if c.class_embed_type is not None or c.num_class_embeds is not None:
        return "class labels"
    if c.addition_embed_type not in (None, "text"):
        return f"added conditions ({c.addition_embed_type})"
    if c.encoder_hid_dim_type is not None:
        return f"a projection of the text ({c.encoder_hid_dim_type})"
    return None


class Denoiser(torch.nn.Module):
    """The UNet as one call of tensors, the form CompiledModule takes: (latents, step_embedding, text, *text_kv).

    The time embedding of every step, and the pooled-text embedding that a UNet with addition_embed_type="text"
    adds to it, depend only on the timesteps and the text, so `step_embeddings` makes them for all steps at
    once, before the loop; `forward` is diffusers' UNet forward from there on (written out here because
    diffusers' takes only timesteps). `text_kv(text)` makes the cross-attention keys and values once per image;
    a UNet with attention TextKVAttnProcessor does not cover gets none and projects the text at every step."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        unsupported = _unsupported_conditioning(unet)
        if unsupported is not None:
            raise BrushworkError(f"this UNet needs {unsupported}, which a text-to-image pipeline does not give; "
                                 "brushwork runs Stable Diffusion 1.x/2.x-style UNets (text and timestep only).")
        attentions = [m for m in unet.modules() if isinstance(m, Attention)]
        self.cross_attentions = [a for a in attentions if a.is_cross_attention]
        if not all(_plain_attention(a) for a in attentions):
            self.cross_attentions = []
            return
        for attn in attentions:
            index = self.cross_attentions.index(attn) if attn.is_cross_attention else None
            attn.set_processor(TextKVAttnProcessor(index))

    def text_kv(self, text: torch.Tensor) -> list[torch.Tensor]:
        # contiguous: compiled code is fixed to its inputs' strides
        return [tensor.contiguous() for attn in self.cross_attentions for tensor in _project_text(attn, text)]

    def step_embeddings(self, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[steps, B, C]: what the UNet's blocks take as `temb` at each step, for `text` [B, T, D]."""
        unet = self.unet
        emb = unet.time_embedding(unet.time_proj(timesteps).to(text.dtype))[:, None]
        added = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs={})
        emb = (emb + added[None] if added is not None else emb.expand(-1, len(text), -1)).contiguous()
        return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb

    def forward(self, sample: torch.Tensor, step_embedding: torch.Tensor, text: torch.Tensor,
                *text_kv: torch.Tensor) -> torch.Tensor:
        kwargs = {"text_kv": text_kv} if text_kv else None
        unet = self.unet
        emb = step_embedding
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        # diffusers passes the up blocks their output size only for sides that do not halve evenly
        uneven = any(side % 2 ** unet.num_upsamplers for side in sample.shape[-2:])
        sample = unet.conv_in(sample)
        skips = (sample,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, outputs = block(hidden_states=sample, temb=emb, encoder_hidden_states=text,
                                        cross_attention_kwargs=kwargs)
            else:
                sample, outputs = block(hidden_states=sample, temb=emb)
            skips += outputs
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = unet.mid_block(sample, emb, encoder_hidden_states=text, cross_attention_kwargs=kwargs)
            else:
                sample = unet.mid_block(sample, emb)
        for block in unet.up_blocks:
            outputs, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            size = skips[-1].shape[2:] if uneven and skips else None
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=outputs,
                               encoder_hidden_states=text, cross_attention_kwargs=kwargs, upsample_size=size)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=outputs, upsample_size=size)
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)


class LatentDecoder(torch.nn.Module):
    """Latents -> images in [-1, 1] through the VAE decoder, as one call of tensors."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(next(self.vae.parameters()).dtype)
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]


class DiffusionModel:
    """Latent diffusion: CLIP text encoder, UNet denoiser, VAE decoder, any diffusers scheduler."""

    kind = "diffusion"

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, unet: UNet2DConditionModel,
                 vae: AutoencoderKL, scheduler_config: dict):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler_config)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.default_size = unet.config.sample_size * self.vae_scale_factor
        self.max_tokens = tokenizer.model_max_length
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self._embedding_cache: dict[str, torch.Tensor] = {}
        self.denoiser = Denoiser(self.unet)
        self.denoise: Callable[..., torch.Tensor] = self.denoiser
        self.decode: Callable[[torch.Tensor], torch.Tensor] = LatentDecoder(self.vae)

    def to(self, device: torch.device, dtype: torch.dtype) -> "DiffusionModel":
        """fp32 everywhere, or the UNet and text encoder in `dtype` (the VAE stays fp32, as half precision
        overflows in SD VAEs). On CPU, weights stay fp32 and a low `dtype` runs under autocast."""
        self.device, self.dtype = device, dtype
        weights_dtype = dtype if device.type != "cpu" else torch.float32
        for module, module_dtype in ((self.text_encoder, weights_dtype), (self.unet, weights_dtype),
                                     (self.vae, torch.float32)):
            module.to(device)
            if module.dtype != module_dtype:
                module.to(module_dtype)
        self._embedding_cache.clear()
        return self

    @property
    def compiled(self) -> bool:
        return isinstance(self.denoise, CompiledModule)

    @property
    def unet_dtype(self) -> torch.dtype:
        """The UNet weights' dtype, read from one parameter: diffusers' `.dtype` walks every module (2.5 ms a
        read, a fifth of a compiled step when it was read per step)."""
        return next(self.unet.parameters()).dtype

    def _autocast(self):
        enabled = self.device.type == "cpu" and self.dtype != torch.float32 and self.unet_dtype == torch.float32
        return torch.autocast("cpu", dtype=self.dtype, enabled=enabled)

    def compile(self) -> None:
        """Compile the UNet (the call made once per sampling step) and the VAE decoder with AOTInductor. On the
        CPU the UNet's weights (and in bf16 the VAE's) take the model dtype first: eager bf16 weights ran 0.6×
        of fp32, compiled ones 2.1× (a 6.5M UNet, batch 2). Call after `to`: the compiled code is fixed to the
        device and dtype."""
        if self.device.type == "cpu" and self.dtype != torch.float32:
            verbosity = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()   # its advice on keeping modules in fp32 does not apply here
            self.unet.to(self.dtype)
            if self.dtype == torch.bfloat16:  # fp32's range, so no fp16 overflow: decoding 21 -> 13 ms, ±3/255
                self.vae.to(self.dtype)
            diffusers_logging.set_verbosity(verbosity)
        self.unet.fuse_qkv_projections()  # one matmul for q, k and v: 5% off a compiled call, the same output
        self.denoiser = Denoiser(self.unet)  # fusing set diffusers' processors: take ours back
        self.denoise = CompiledModule(self.denoiser, "unet")
        self.decode = CompiledModule(LatentDecoder(self.vae), "vae-decoder")

    def token_count(self, prompt: str) -> int:
        """Tokens the prompt takes, start and end tokens included."""
        return len(self.tokenizer(prompt, truncation=False).input_ids)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [len(prompts), tokens, dim]; repeated prompts (the empty one above all) are cached."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._embedding_cache))
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.max_tokens, truncation=True,
                                 return_tensors="pt").input_ids.to(self.device)
            with self._autocast():
                embeddings = self.text_encoder(ids)[0]
            if len(self._embedding_cache) + len(missing) > 256:  # bounded: a server meets endless prompts
                self._embedding_cache = {p: e for p, e in self._embedding_cache.items() if p in prompts}
            self._embedding_cache.update(zip(missing, embeddings))
        return torch.stack([self._embedding_cache[p] for p in prompts])

    def generate(self, pipe: "BrushworkPipeline", prompts: list[str], negative_prompts: list[str],
                 generators: list[torch.Generator] | torch.Generator | None, num_inference_steps: int,
                 guidance_scale: float, sampler: str, height: int, width: int,
                 callback_on_step_end: Callable | None, layout: bool = False) -> torch.Tensor:
        """Images [B, 3, H, W] as float32 in [0, 1] on the CPU. layout: prompts that say where two things stand
        are sampled with layout guidance (brushwork.layout), the others as usual."""
        plans = [plan_layout(p) for p in prompts] if layout else [None] * len(prompts)
        groups = [g for g in ([i for i, plan in enumerate(plans) if (plan is not None) == planned]
                              for planned in (False, True)) if g]
        if len(groups) == 1:
            latents = self._sample(pipe, prompts, negative_prompts, generators, num_inference_steps, guidance_scale,
                                   sampler, height, width, callback_on_step_end, plans if plans[0] else None)
        else:  # planned and plain prompts start at different steps: two runs, one batch of latents
            latents = torch.zeros(self._latent_shape(len(prompts), height, width), device=self.device)
            for indices in groups:
                rows = torch.tensor(indices, device=self.device)
                callback = callback_on_step_end and _rows_callback(callback_on_step_end, rows, latents)
                group = self._sample(pipe, [prompts[i] for i in indices], [negative_prompts[i] for i in indices],
                                     [generators[i] for i in indices] if isinstance(generators, list) else generators,
                                     num_inference_steps, guidance_scale, sampler, height, width, callback,
                                     [plans[i] for i in indices] if plans[indices[0]] else None)
                latents[rows] = group
        images = self.decode(latents)
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    def _latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    def _sketch_latents(self, plans: list[list[Region]], height: int, width: int) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        images = torch.stack([sketch(plan, height, width) for plan in plans]).to(self.device, vae_dtype)
        return (self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor).float()

    def _sample(self, pipe: "BrushworkPipeline", prompts: list[str], negative_prompts: list[str],
                generators: list[torch.Generator] | torch.Generator | None, num_inference_steps: int,
                guidance_scale: float, sampler: str, height: int, width: int, callback_on_step_end: Callable | None,
                plans: list[list[Region]] | None) -> torch.Tensor:
        """Final latents of prompts; plans: one layout per prompt, or None for plain sampling."""
        scheduler = SAMPLERS[sampler].from_config(self.scheduler_config)  # schedulers keep per-call state
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        order = scheduler.order
        use_guidance = guidance_scale > 1.0
        unet_dtype = self.unet_dtype
        text = self.encode(prompts)
        if use_guidance:
            text = torch.cat([self.encode(negative_prompts), text])
        text = text.to(unet_dtype)
        shape = self._latent_shape(len(prompts), height, width)
        timesteps, first, regional_until = scheduler.timesteps, 0, 0
        if plans is None:
            latents = randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)
            latents = latents * scheduler.init_noise_sigma
        else:
            first = round(num_inference_steps * START)
            regional_until = round(num_inference_steps * REGIONAL_UNTIL)
            timesteps = timesteps[first * order:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(first * order)
            noise = randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)
            latents = scheduler.add_noise(self._sketch_latents(plans, height, width), noise,
                                          timesteps[:1].repeat(len(prompts)))
            # Until REGIONAL_UNTIL each image is led by pieces of text, each over part of the canvas: a relation's
            # phrases over their regions (the rest by the negative prompt alone), or else the prompt over all.
            pieces = [[(r.phrase, r) for r in plan if r.phrase] or [(prompt, None)]
                      for prompt, plan in zip(prompts, plans)]
            owners = torch.tensor([b for b, own in enumerate(pieces) for _ in own], device=self.device)
            masks = torch.cat([region_masks([r], shape[2], shape[3]) if r else torch.ones(1, 1, *shape[2:])
                               for own in pieces for _, r in own]).to(self.device)
            region_text = torch.cat([self.encode(negative_prompts),
                                     self.encode([text for own in pieces for text, _ in own])]).to(unet_dtype)
        step_kwargs = {"generator": generators} if "generator" in _step_parameters(scheduler) else {}
        with self._autocast():
            text_kv = self.denoiser.text_kv(text)
            step_embeddings = self.denoiser.step_embeddings(timesteps, text)
            if plans is not None:
                region_kv = self.denoiser.text_kv(region_text)
                region_embeddings = self.denoiser.step_embeddings(timesteps, region_text)
            for i, t in enumerate(timesteps):
                step = first * order + i  # the index into the whole schedule, as in plain sampling
                if step < regional_until * order:
                    model_input = scheduler.scale_model_input(torch.cat([latents, latents[owners]]), t)
                    noise = self.denoise(model_input.to(unet_dtype), region_embeddings[i], region_text,
                                         *region_kv).float()
                    uncond, regions = noise[:len(prompts)], noise[len(prompts):]
                    scale = guidance_scale if use_guidance else 1.0
                    steer = torch.zeros_like(latents).index_add_(0, owners, masks * (regions - uncond[owners]))
                    noise = uncond + scale * steer
                else:
                    model_input = torch.cat([latents, latents]) if use_guidance else latents
                    model_input = scheduler.scale_model_input(model_input, t).to(unet_dtype)
                    noise = self.denoise(model_input, step_embeddings[i], text, *text_kv).float()
                    if use_guidance:
                        uncond, cond = noise.chunk(2)
                        noise = uncond + guidance_scale * (cond - uncond)
                latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    update = callback_on_step_end(pipe, step, t, {"latents": latents}) or {}
                    if update.get("cancel"):
                        raise GenerationCancelled(f"cancelled at step {step // order + 1} of {num_inference_steps}")
                    latents = update.get("latents", latents)
        return latents


def _rows_callback(callback: Callable, rows: torch.Tensor, batch_latents: torch.Tensor) -> Callable:
    """callback_on_step_end for a run over some rows of the batch: the callback sees the whole batch's latents
    (the finished rows of the other run, zeros for rows not sampled yet) and may replace them."""
    def on_step(pipe, step, timestep, tensors: dict) -> dict:
        whole = batch_latents.clone()
        whole[rows] = tensors["latents"]
        update = callback(pipe, step, timestep, {**tensors, "latents": whole}) or {}
        return {**update, "latents": update["latents"][rows]} if "latents" in update else update
    return on_step


def _step_parameters(scheduler) -> set[str]:
    return set(inspect.signature(scheduler.step).parameters)


# ---- loading ------------------------------------------------------------------------------------


def _load_component(kind: str, loader: Callable, folder: Path):
    if not folder.is_dir():
        raise BrushworkError(f"model folder is missing its {kind} at {folder}; is this a complete model folder?")
    try:
        return loader(folder)
    except BrushworkError:
        raise
    except Exception as error:  # diffusers/transformers raise many kinds for bad files
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BrushworkError(f"could not load the {kind} from {folder}: {message}") from None


def _load_diffusers_folder(folder: Path) -> DiffusionModel:
    try:
        index = json.loads((folder / "model_index.json").read_text())
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BrushworkError(f"model folder {folder} has a missing or corrupt config: {error}") from None
    if not isinstance(index, dict) or not isinstance(scheduler_config, dict):
        raise BrushworkError(f"model folder {folder} has a corrupt config: model_index.json and "
                             "scheduler/scheduler_config.json must each hold a JSON object")
    scheduler_config.setdefault("clip_sample", False)  # as in SD; older brushwork folders did not say
    if "unet" not in index:
        raise BrushworkError(f"{folder / 'model_index.json'} names no unet; only Stable Diffusion-style folders "
                             "(unet, vae, text_encoder, tokenizer, scheduler) are supported")
    tokenizer = _load_component("tokenizer", CLIPTokenizer.from_pretrained, folder / "tokenizer")
    text_encoder = _load_component("text encoder", partial(load_pretrained, "text encoder", CLIPTextModel),
                                   folder / "text_encoder")
    unet = _load_component("unet", partial(load_pretrained, "unet", UNet2DConditionModel), folder / "unet")
    vae = _load_component("vae", partial(load_pretrained, "vae", AutoencoderKL), folder / "vae")
    return DiffusionModel(tokenizer, text_encoder, unet, vae, scheduler_config)


def _read_single_file(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            state = safetensors.torch.load_file(str(path))
        except Exception as error:
            raise BrushworkError(f"{path} is not a readable .safetensors file (truncated or corrupt?): {error}") from None
    elif path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise BrushworkError(f"{path} is a pickle file, which can run code when loaded; convert it to "
                                 ".safetensors, or pass --allow-pickle (allow_pickle=True) if you trust it")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:
            raise BrushworkError(f"could not read {path} (weights only): {error}") from None
    else:
        raise BrushworkError(f"{path}: unknown model file type; expected a folder, .safetensors or .ckpt")
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BrushworkError(f"{path} does not hold a state dict of tensors")
    return state


def _sd_version(state: dict[str, torch.Tensor], path: Path) -> str:
    if "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state:
        return "v1"
    if "cond_stage_model.model.token_embedding.weight" in state:
        return "v2"
    raise BrushworkError(f"{path} is not a Stable Diffusion 1.x/2.x checkpoint (no CLIP or OpenCLIP text "
                         "encoder weights found); SDXL and other families are not supported")


def _count(state: dict, prefix: str) -> int:
    """Number of consecutive numbered children `prefix{i}.` present."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in state):
        n += 1
    return n


def _infer_configs(state: dict[str, torch.Tensor], version: str) -> dict[str, dict]:
    """The shipped SD template configs with every shape read from the weights themselves.

    Attention head counts are not visible in weights; they follow the SD convention of the version:
    8 heads per UNet block for 1.x, 64-wide heads for 2.x and for both CLIP text encoders.
    """
    configs = json.loads((SD_CONFIG_DIR / f"{version}.json").read_text())
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    u = "model.diffusion_model."
    per_level = next(i for i in range(1, 64) if f"{u}input_blocks.{i}.0.op.weight" in state)
    levels = (_count(state, f"{u}input_blocks.") - 1) // per_level + 1
    unet["layers_per_block"] = per_level - 1
    unet["block_out_channels"] = [state[f"{u}input_blocks.{per_level * i + 1}.0.out_layers.3.weight"].shape[0]
                                  for i in range(levels)]
    attention = [f"{u}input_blocks.{per_level * i + 1}.1.norm.weight" in state for i in range(levels)]
    unet["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    unet["up_block_types"] = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    unet["in_channels"] = state[f"{u}input_blocks.0.0.weight"].shape[1]
    unet["out_channels"] = state[f"{u}out.2.weight"].shape[0]
    first_attention = next(k for k in state if k.startswith(u) and k.endswith("attn2.to_k.weight"))
    unet["cross_attention_dim"] = state[first_attention].shape[1]
    if version == "v2":
        unet["attention_head_dim"] = [max(1, c // 64) for c in unet["block_out_channels"]]

    f = "first_stage_model."
    vae_levels = _count(state, f"{f}encoder.down.")
    vae["block_out_channels"] = [state[f"{f}encoder.down.{i}.block.0.conv2.weight"].shape[0]
                                 for i in range(vae_levels)]
    vae["layers_per_block"] = _count(state, f"{f}encoder.down.0.block.")
    vae["down_block_types"] = ["DownEncoderBlock2D"] * vae_levels
    vae["up_block_types"] = ["UpDecoderBlock2D"] * vae_levels
    vae["latent_channels"] = state[f"{f}post_quant_conv.weight"].shape[0]
    vae["in_channels"] = state[f"{f}encoder.conv_in.weight"].shape[1]
    vae["out_channels"] = state[f"{f}decoder.conv_out.weight"].shape[0]

    if version == "v1":
        t = "cond_stage_model.transformer.text_model."
        tokens = state[f"{t}embeddings.token_embedding.weight"]
        positions = state[f"{t}embeddings.position_embedding.weight"]
        text["num_hidden_layers"] = _count(state, f"{t}encoder.layers.")
        text["intermediate_size"] = state[f"{t}encoder.layers.0.mlp.fc1.weight"].shape[0]
    else:
        t = "cond_stage_model.model."
        tokens = state[f"{t}token_embedding.weight"]
        positions = state[f"{t}positional_embedding"]
        # SD 2.x conditions on OpenCLIP's penultimate layer: the last block in the file goes unused.
        text["num_hidden_layers"] = _count(state, f"{t}transformer.resblocks.") - 1
        text["intermediate_size"] = state[f"{t}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    text["vocab_size"], text["hidden_size"] = tokens.shape
    text["max_position_embeddings"] = positions.shape[0]
    text["num_attention_heads"] = max(1, text["hidden_size"] // 64)
    return configs


def _load_weights(kind: str, module: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path,
                  ignore_unexpected: bool = False) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{k} {tuple(weights[k].shape)} (model has {tuple(expected[k].shape)})"
             for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or wrong or (unexpected and not ignore_unexpected):
        problems = [f"missing {missing[:3]}" if missing else "", f"wrong shape {wrong[:3]}" if wrong else "",
                    f"unexpected {unexpected[:3]}" if unexpected and not ignore_unexpected else ""]
        raise BrushworkError(f"{path}: the {kind} weights do not fit a Stable Diffusion {kind}: "
                             + "; ".join(p for p in problems if p))
    module.load_state_dict({k: weights[k] for k in expected})


def _load_single_file(path: Path, allow_pickle: bool) -> DiffusionModel:
    state = _read_single_file(path, allow_pickle)
    version = _sd_version(state, path)
    try:
        configs = _infer_configs(state, version)
    except (KeyError, StopIteration, IndexError) as error:
        raise BrushworkError(f"{path}: incomplete Stable Diffusion {version[1]}.x checkpoint ({error})") from None

    unet = UNet2DConditionModel.from_config(configs["unet"])
    _load_weights("unet", unet, convert_ldm_unet_checkpoint(state, configs["unet"]), path)
    vae = AutoencoderKL.from_config(configs["vae"])
    _load_weights("vae", vae, convert_ldm_vae_checkpoint(state, configs["vae"]), path)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    if version == "v1":
        text_weights = convert_ldm_clip_checkpoint(state)
    else:
        layers = configs["text_encoder"]["num_hidden_layers"]
        unused = f"cond_stage_model.model.transformer.resblocks.{layers}."
        text_weights = convert_open_clip_checkpoint(text_encoder, {k: v for k, v in state.items()
                                                                   if not k.startswith(unused)})
    text_weights = {k.removeprefix("text_model."): v for k, v in text_weights.items()}
    # position_ids buffers and the OpenCLIP projection are not part of CLIPTextModel.
    _load_weights("text encoder", text_encoder, text_weights, path, ignore_unexpected=True)

    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, **configs["tokenizer"])
    if len(tokenizer) != configs["text_encoder"]["vocab_size"]:
        raise BrushworkError(f"{path}: its text encoder has {configs['text_encoder']['vocab_size']} tokens, but "
                             f"Stable Diffusion's CLIP tokenizer has {len(tokenizer)}")
    return DiffusionModel(tokenizer, text_encoder, unet, vae, configs["scheduler"])


def load_model(path: Path, allow_pickle: bool = False) -> DiffusionModel | GanModel:
    """The model behind a path: a diffusers SD folder, a single SD 1.x/2.x file, or a brushwork GAN folder."""
    if not path.exists():
        shipped = ", ".join(shipped_models()) or "none"
        raise BrushworkError(f"model not found: {path} (the models shipped with brushwork: {shipped})")
    if path.is_file():
        return _load_single_file(path, allow_pickle)
    if (path / "model_index.json").is_file():
        return _load_diffusers_folder(path)
    if is_gan_folder(path):
        return GanModel.from_pretrained(path)
    if (path / "config.json").is_file():
        raise BrushworkError(f"{path / 'config.json'}: this kind of model folder is not supported yet; "
                             "expected a Stable Diffusion folder with model_index.json")
    raise BrushworkError(f"{path} is not a model folder (no model_index.json); pass a folder written by "
                         "`brushwork train`, a diffusers Stable Diffusion folder, or a .safetensors file")


def _weights_hash(path: Path) -> str:
    """First 10 hex digits of sha256 over the weights: the file itself (as AUTOMATIC1111 does), or a
    folder's weight files in path order."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt") and p.is_file())
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:10]


def shipped_models() -> list[str]:
    """Names of the models installed with brushwork (folders under assets/models)."""
    if not SHIPPED_MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_MODELS_DIR.iterdir() if p.is_dir() and not p.name.startswith("."))


def _to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """[B, 3, H, W] float in [0, 1] on the CPU -> 8-bit RGB PIL images."""
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [PIL.Image.fromarray(a) for a in arrays]


def candidate_seed(seed: int, candidate: int) -> int:
    """The seed of best_of's candidate `candidate` (0, 1, ...) of the image whose seed is `seed`."""
    return seed if candidate == 0 else random.Random(f"{seed}-{candidate}").randrange(2**32)


def resolve_model(model: str | Path | None) -> Path:
    """A model path, or the name of a shipped model ("shapes", "shapes-gan"); None means the default shipped
    model, whatever lies in the working folder. A path that exists wins over a shipped name given by hand."""
    if model is None:
        if DEFAULT_MODEL not in shipped_models():
            raise BrushworkError("no default model is installed with this brushwork; pass --model PATH (a model "
                                 "folder or .safetensors file)")
        return SHIPPED_MODELS_DIR / DEFAULT_MODEL
    path = Path(model).expanduser()
    if not path.exists() and str(model) in shipped_models():
        return SHIPPED_MODELS_DIR / str(model)
    return path


@contextmanager
def _num_threads(threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _default_dtype(device: torch.device, compiled: bool = False) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if compiled and cpu_has_native_bf16() else torch.float32


class BrushworkPipeline:
    """Loads a model and turns prompts into images. Reuse one pipeline for many calls."""

    def __init__(self, model: DiffusionModel | GanModel, path: Path, device: torch.device, dtype: torch.dtype,
                 threads: int | None = None):
        self.model = model.to(device, dtype)
        self._told_steps_unused = False
        self.path = path
        self.device = device
        self.dtype = dtype
        self.threads = threads or torch.get_num_threads()
        self.name = path.stem if path.is_file() else path.name

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, allow_pickle: bool = False,
                        threads: int | None = None, compile: bool = False) -> "BrushworkPipeline":
        """path: a model folder, an SD single file or a shipped model's name ("shapes", "shapes-gan"); None
        means the default model shipped with brushwork. dtype: None picks the device's fast precision: fp32
        on CPU (bf16 measured no faster there), which gives the same images as diffusers; bf16/fp16 on GPUs.
        threads: CPU threads while sampling. compile: compile the UNet and VAE decoder with AOTInductor (the
        first call of each batch size compiles for 2-3 minutes and keeps the result in the cache, from where
        later processes load it in a second; sampling is then 2.5-3x as fast on the CPU). With compile, dtype
        None means bf16 on CPUs with native bf16 (AVX512-BF16 or AMX), whose images differ from fp32's by a
        few levels out of 255."""
        path = resolve_model(path)
        try:
            device = torch.device(device) if device is not None else default_device()
        except RuntimeError:
            raise BrushworkError(f"unknown device '{device}'; use cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BrushworkError("device cuda was asked for, but no CUDA GPU is available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise BrushworkError("device mps was asked for, but MPS is not available")
        dtype = dtype or _default_dtype(device, compiled=compile)
        pipe = cls(load_model(path, allow_pickle=allow_pickle), path, device, dtype, threads)
        if compile:
            pipe.model.compile()
        return pipe

    @property
    def compiled(self) -> bool:
        return self.model.compiled

    @cached_property
    def model_hash(self) -> str:
        return _weights_hash(self.path)

    @property
    def default_size(self) -> int:
        return self.model.default_size

    def _check(self, prompts: list[str], negative_prompts: list[str], steps: int, guidance: float, n: int,
               height: int, width: int) -> None:
        if not isinstance(steps, int) or steps <= 0:
            raise BrushworkError(f"steps must be a positive whole number, got {steps}")
        if steps > 1000:
            raise BrushworkError(f"steps must be at most 1000, got {steps}")
        if not math.isfinite(guidance) or guidance < 0:
            raise BrushworkError(f"guidance scale must be a finite number >= 0, got {guidance}")
        if n <= 0 or n > MAX_IMAGES:
            raise BrushworkError(f"number of images per prompt must be between 1 and {MAX_IMAGES}, got {n}")
        if not prompts or len(prompts) * n > MAX_IMAGES:
            raise BrushworkError(f"one call makes 1 to {MAX_IMAGES} images; got {len(prompts)} prompts x {n}")
        if len(negative_prompts) != len(prompts):
            raise BrushworkError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        factor = self.model.vae_scale_factor
        for name, side in (("height", height), ("width", width)):
            if side <= 0 or side % factor:
                raise BrushworkError(f"{name} must be a positive multiple of {factor} for this model, got {side}")
            if side > MAX_SIDE:
                raise BrushworkError(f"{name} must be at most {MAX_SIDE}, got {side}")
        for prompt in dict.fromkeys(prompts + negative_prompts):
            count = self.model.token_count(prompt)
            if count > self.model.max_tokens:
                kept = self.model.max_tokens - 2
                warnings.warn(f"prompt is {count - 2} tokens long but the model reads only {kept}; the rest is "
                              f"ignored: {prompt[:60]!r}...", stacklevel=3)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float = 5.0,
                 num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 seed: int | list[int] | None = None,
                 height: int | None = None, width: int | None = None, sampler: str | None = None,
                 callback_on_step_end: Callable | None = None, output_type: str = "pil",
                 layout: bool = False, best_of: int = 1) -> GenerationOutput:
        """Generate num_images_per_prompt images for each prompt.

        Image k (counting over all prompts, each prompt's images together) uses seed + k, so it equals
        the single image made with that seed; a list of seeds gives each image its own.
        callback_on_step_end(pipe, step, timestep, {"latents": ...}) may return {"latents": new} to replace them
        or {"cancel": True} to stop (GenerationCancelled).
        num_inference_steps defaults to 20; a one-step GAN ignores it and says so once (unless it is 1).
        layout: sample prompts of the form "A left of / right of / above / below B" or "two / three / four Xs" with
        layout guidance, which draws A and B where the relation puts them, or each copy apart (brushwork.layout);
        other prompts are sampled as usual.
        best_of: make each image best_of times, from different seeds, and keep the one the model's CLIP finds
        closest to its prompt (reranking, as DALL-E did); best_of times the work. The seed recorded for an image
        is the kept candidate's, so that seed with best_of=1 makes the same image. The callback numbers the steps
        of later candidates on from the earlier ones', so a progress count covers them all.
        """
        if isinstance(best_of, bool) or not isinstance(best_of, int) or not 1 <= best_of <= MAX_BEST_OF:
            raise BrushworkError(f"best_of must be a whole number from 1 to {MAX_BEST_OF}, got {best_of!r}")
        if best_of > 1:
            self.ranker  # noqa: B018 -- a model without a CLIP fails here, before any sampling
        if self.model.kind == "gan" and num_inference_steps not in (None, 1) and not self._told_steps_unused:
            warnings.warn("num_inference_steps has no effect: this model is a one-step GAN", stacklevel=2)
            self._told_steps_unused = True
        if layout and self.model.kind != "diffusion":
            raise BrushworkError("layout guidance needs a diffusion model: a one-step GAN has no sampling steps "
                                 "to guide")
        num_inference_steps = 20 if num_inference_steps is None else num_inference_steps
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        sampler = resolve_sampler(sampler)
        height = height or self.default_size
        width = width or self.default_size
        if output_type not in ("pil", "np", "pt"):
            raise BrushworkError(f"output_type must be pil, np or pt, got {output_type!r}")
        self._check(prompts, negatives, num_inference_steps, float(guidance_scale), num_images_per_prompt,
                    height, width)
        n = num_images_per_prompt
        prompts = [p for p in prompts for _ in range(n)]
        negatives = [p for p in negatives for _ in range(n)]
        if generator is not None:
            seeds = [None] * len(prompts)
            if isinstance(generator, list) and len(generator) != len(prompts):
                raise BrushworkError(f"got {len(generator)} generators for {len(prompts)} images")
        elif isinstance(seed, (list, tuple)):
            if len(seed) != len(prompts):
                raise BrushworkError(f"got {len(seed)} seeds for {len(prompts)} images")
            seeds = [int(s) for s in seed]
            generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        else:
            seed = random.randrange(2**32) if seed is None else int(seed)
            seeds = [seed + k for k in range(len(prompts))]
            generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]

        def sample(generators, candidate: int = 0) -> torch.Tensor:
            offset = candidate * num_inference_steps * SAMPLERS[sampler].order

            def numbered_on(pipe, step, *rest):
                return callback_on_step_end(pipe, offset + step, *rest)

            callback = numbered_on if callback_on_step_end is not None and offset else callback_on_step_end
            return self.model.generate(self, prompts, negatives, generators, num_inference_steps,
                                       float(guidance_scale), sampler, height, width, callback, layout=layout)

        with torch.inference_mode(), _num_threads(self.threads):
            images = sample(generator)
            if best_of > 1:
                images, seeds = self._keep_best(images, prompts, seeds, generator, best_of, sample)
        if output_type == "pt":
            result = list(images)
        else:
            result = list(images.permute(0, 2, 3, 1).numpy()) if output_type == "np" else _to_pil(images)
        return GenerationOutput(result, prompts, negatives, seeds, num_inference_steps, float(guidance_scale),
                                sampler, height, width, self.name, self.model_hash,
                                extra={**({"layout": "on"} if layout else {}),
                                       **({"best_of": best_of} if best_of > 1 else {})},
                                one_step=self.model.kind == "gan")

    @property
    def clip_folder(self) -> Path | None:
        """The model folder whose clip/ (and tokenizer/) ranks best_of's candidates: this one, or for a GAN the one
        its text encoder comes from; None when there is no clip/ (an SD checkpoint, a bare folder)."""
        if not self.path.is_dir():
            return None
        folder = text_encoder_folder(self.path) if self.model.kind == "gan" else self.path
        return folder if (folder / "clip" / "config.json").is_file() else None

    @cached_property
    def ranker(self):
        """The model's CLIP, which scores best_of's candidates."""
        folder = self.clip_folder
        if folder is None:
            raise BrushworkError(f"best_of ranks images with the model's CLIP, and {self.path} has no clip/ folder "
                                 "(`brushwork train` writes one; Stable Diffusion checkpoints and the shipped emoji "
                                 "model have none)")
        return ClipEmbedder(folder / "clip", folder / "tokenizer", device=str(self.device))

    def _keep_best(self, images: torch.Tensor, prompts: list[str], seeds: list[int | None],
                   generator: torch.Generator | list[torch.Generator], best_of: int,
                   sample: Callable) -> tuple[torch.Tensor, list[int | None]]:
        """Of best_of candidates per image (`images` is the first of them), the one whose CLIP image embedding is
        closest to its prompt's, and its seed. Later candidates take seeds drawn from (image seed, candidate), so
        no two images share a candidate (as seed + k would), or continue a caller's generators."""
        text = torch.nn.functional.normalize(self.ranker.text_embeds(prompts), dim=-1)

        def similarity(batch: torch.Tensor) -> torch.Tensor:
            return (torch.nn.functional.normalize(self.ranker.image_embeds(_to_pil(batch)), dim=-1) * text).sum(-1)

        best, best_score, best_seeds = images, similarity(images), list(seeds)
        for candidate in range(1, best_of):
            if seeds[0] is None:
                candidate_seeds, generators = seeds, generator
            else:
                candidate_seeds = [candidate_seed(seed, candidate) for seed in seeds]
                generators = [torch.Generator("cpu").manual_seed(s) for s in candidate_seeds]
            images = sample(generators, candidate)
            score = similarity(images)
            better = score > best_score
            best[better], best_score[better] = images[better], score[better]
            best_seeds = [new if won else old for new, old, won in zip(candidate_seeds, best_seeds, better.tolist())]
        return best, best_seeds
