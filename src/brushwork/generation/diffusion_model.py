"""Latent diffusion's parts: CLIP text encoder, UNet, VAE and scheduler config, on one device and dtype."""

from typing import Callable

import torch
from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextModel, CLIPTokenizer

from brushwork.generation.fast_unet import Denoiser, check_text_only_unet
from brushwork.hardware import CompiledModule

# (model input, step index, timestep) -> the UNet's prediction, for one call's text and timesteps
UNetStep = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """[len(w), dim]: the embedding of the guidance w (= guidance scale - 1) that a few-step (distilled) UNet takes
    as `timestep_cond`. diffusers' LatentConsistencyModelPipeline's own (a method that uses nothing of its
    pipeline), so that training, brushwork's sampling and diffusers' give the same numbers."""
    embedding = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w.float().cpu(), embedding_dim=dim)
    return embedding.to(w.device)   # it makes its frequencies on the CPU


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
        check_text_only_unet(unet)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler_config)
        # A few-step model (brushwork train distill) samples with LCMScheduler; a UNet with time_cond_proj_dim
        # takes the guidance scale as an input (one UNet call a step) instead of classifier-free guidance.
        self.few_step = self.scheduler_config.get("_class_name") == "LCMScheduler"
        self.guidance_embedded = unet.config.time_cond_proj_dim is not None
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.default_size = unet.config.sample_size * self.vae_scale_factor
        self.max_tokens = tokenizer.model_max_length
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self._embedding_cache: dict[str, torch.Tensor] = {}
        self.denoiser: Denoiser | None = None  # the fast UNet step, made by compile()
        self.denoise: CompiledModule | None = None
        self.decoder = LatentDecoder(self.vae)
        self.decode: Callable[[torch.Tensor], torch.Tensor] = self.decoder

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
        return self.denoise is not None

    @property
    def unet_dtype(self) -> torch.dtype:
        """The UNet weights' dtype, read from one parameter: diffusers' `.dtype` walks every module (2.5 ms a
        read, a fifth of a compiled step when it was read per step)."""
        return next(self.unet.parameters()).dtype

    def autocast(self):
        enabled = self.device.type == "cpu" and self.dtype != torch.float32 and self.unet_dtype == torch.float32
        return torch.autocast("cpu", dtype=self.dtype, enabled=enabled)

    def compile(self) -> None:
        """Compile the fast UNet step (the call made once per sampling step) and the VAE decoder with
        AOTInductor. On the CPU the UNet's weights (and in bf16 the VAE's) take the model dtype first: eager
        bf16 weights ran 0.6× of fp32, compiled ones 2.1× (a 6.5M UNet, batch 2). Call after `to`: the
        compiled code is fixed to the device and dtype."""
        if self.device.type == "cpu" and self.dtype != torch.float32:
            verbosity = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()   # its advice on keeping modules in fp32 does not apply here
            self.unet.to(self.dtype)
            if self.dtype == torch.bfloat16:  # fp32's range, so no fp16 overflow: decoding 21 -> 13 ms, ±3/255
                self.vae.to(self.dtype)
            diffusers_logging.set_verbosity(verbosity)
        self.unet.fuse_qkv_projections()  # one matmul for q, k and v: 5% off a compiled call, the same output
        self.denoiser = Denoiser(self.unet)  # after fusing, which sets diffusers' processors
        self.denoise = CompiledModule(self.denoiser, "unet")
        self.decode = CompiledModule(self.decoder, "vae-decoder")

    def token_count(self, prompt: str) -> int:
        """Tokens the prompt takes, start and end tokens included."""
        return len(self.tokenizer(prompt, truncation=False).input_ids)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [len(prompts), tokens, dim]; repeated prompts (the empty one above all) are cached."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._embedding_cache))
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.max_tokens, truncation=True,
                                 return_tensors="pt").input_ids.to(self.device)
            with self.autocast():
                embeddings = self.text_encoder(ids)[0]
            if len(self._embedding_cache) + len(missing) > 256:  # bounded: a server meets endless prompts
                self._embedding_cache = {p: e for p, e in self._embedding_cache.items() if p in prompts}
            self._embedding_cache.update(zip(missing, embeddings))
        return torch.stack([self._embedding_cache[p] for p in prompts])

    def guidance_condition(self, guidance_scale: float, batch: int) -> torch.Tensor | None:
        """What a guidance-embedding UNet takes as timestep_cond for `guidance_scale` (w = scale - 1, as diffusers'
        LatentConsistencyModelPipeline); None for other UNets."""
        if not self.guidance_embedded:
            return None
        w = torch.full((batch,), guidance_scale - 1.0)
        return guidance_embedding(w, self.unet.config.time_cond_proj_dim).to(self.device, self.unet_dtype)

    def unet_step(self, timesteps: torch.Tensor, text: torch.Tensor,
                  guidance: torch.Tensor | None = None) -> UNetStep:
        """The UNet for one sampling run over `timesteps` with `text` (and a few-step model's `guidance`, from
        guidance_condition): diffusers' own forward, or once compiled, the compiled fast step with its step
        embeddings and text keys and values made here, before the loop."""
        if self.denoise is None:
            def unet(sample: torch.Tensor, index: int, t: torch.Tensor) -> torch.Tensor:
                return self.unet(sample.to(self.unet_dtype), t, encoder_hidden_states=text, timestep_cond=guidance,
                                 return_dict=False)[0]
            return unet
        text_kv = self.denoiser.text_kv(text)
        step_embeddings = self.denoiser.step_embeddings(timesteps, text, guidance)

        def compiled_unet(sample: torch.Tensor, index: int, t: torch.Tensor) -> torch.Tensor:
            return self.denoise(sample.to(self.unet_dtype), step_embeddings[index], text, *text_kv)
        return compiled_unet

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (the mean of the VAE's posterior), float32."""
        images = images.to(self.device, next(self.vae.parameters()).dtype)
        return (self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor).float()
