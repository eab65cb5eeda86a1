"""A text-conditional GAN: one forward pass of G makes a 64×64 image from noise and a caption.

Ideas taken: DF-GAN (per-channel affine modulation of every block by noise + sentence embedding, no
normalisation layers; a discriminator that sees the sentence by concatenation at 4×4 and a matching-aware
loss), GALIP/GigaGAN (cross-attention from image features to the text encoder's word features at the coarse
levels; a mapping MLP from noise + sentence to a style vector), and the projection discriminator's
inner-product term with the sentence embedding.

Pixel space, not the VAE's latent space: on this CPU the small VAE's decoder alone takes 38 ms per 64×64
image, 3× the whole per-image budget of a GAN that is to be 50× faster than 20 diffusion steps (628 ms).
Conditioning is the frozen CLIP text tower the diffusion model uses: `pooler_output` (the end token's
feature) as the sentence, `last_hidden_state` up to the end token as the words.

A saved generator folder: config.json (GeneratorConfig + "brushwork_kind": "gan"), model.safetensors (G),
tokenizer/, text_encoder/ (and clip/ when the source model had one).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import PIL.Image
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_model
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from brushwork.errors import BrushworkError
from brushwork.generation.output import to_pil
from brushwork.generation.registry import resolve_model
from brushwork.models.loading import load_pretrained, load_state

GAN_KIND = "gan"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class GeneratorConfig:
    text_dim: int                          # hidden size of the text encoder
    z_dim: int = 64
    style_dim: int = 128
    channels: tuple[int, ...] = (256, 128, 64, 32, 16)   # at 4×4, 8×8, ... resolution
    attention_levels: tuple[int, ...] = (8, 16)          # feature sides with cross-attention to the words
    heads: int = 2

    @property
    def resolution(self) -> int:
        return 4 * 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class DiscriminatorConfig:
    text_dim: int
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)  # at 64×64, 32×32, ... 4×4
    sentence_dim: int = 64                              # sentence features concatenated at 4×4


GAN_SIZES: dict[str, dict] = {
    "tiny": dict(g=dict(z_dim=8, style_dim=16, channels=(16, 8, 8, 8), attention_levels=(8,), heads=1),
                 d=dict(channels=(8, 8, 8, 16), sentence_dim=8), steps=6, batch_size=4),  # 32×32
    "small": dict(g=dict(z_dim=64, style_dim=128, channels=(256, 128, 64, 32, 16), attention_levels=(8, 16), heads=2),
                  d=dict(channels=(16, 32, 64, 128, 256), sentence_dim=64), steps=6000, batch_size=32),
}


def gan_size(name: str) -> dict:
    if name not in GAN_SIZES:
        raise BrushworkError(f"unknown GAN size {name!r}: choose one of {', '.join(GAN_SIZES)}.")
    return GAN_SIZES[name]


class Affine(nn.Module):
    """DF-GAN's conditional affine on group-normalised features (as AdaIN): norm(h) * (1 + gamma(w)) + beta(w).

    Without the normalisation (DF-GAN has none) the small G's activations ran away within 50 steps here."""

    def __init__(self, style_dim: int, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(min(8, channels), channels, affine=False)
        self.to_scale_shift = nn.Linear(style_dim, 2 * channels)
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)

    def forward(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        scale, shift = self.to_scale_shift(w)[:, :, None, None].chunk(2, dim=1)
        return self.norm(h) * (1 + scale) + shift


class WordAttention(nn.Module):
    """Image features (queries) attend to the word features of the caption; residual, zero-initialised out."""

    def __init__(self, channels: int, text_dim: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.attention = nn.MultiheadAttention(channels, heads, kdim=text_dim, vdim=text_dim, batch_first=True)
        nn.init.zeros_(self.attention.out_proj.weight)

    def forward(self, h: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        # nn.MultiheadAttention's own forward, spelled out on its weights: with kdim != channels it projects the
        # queries in a transposed, non-contiguous layout that PyTorch runs as one tiny matmul per pixel (a third of
        # a GAN image's time at batch 1 on a CPU).
        b, c, height, width = h.shape
        attention, heads = self.attention, self.attention.num_heads
        q_bias, k_bias, v_bias = attention.in_proj_bias.chunk(3)
        queries = self.norm(h).flatten(2).transpose(1, 2).reshape(b, height * width, c)
        q = F.linear(queries, attention.q_proj_weight, q_bias)
        k = F.linear(words, attention.k_proj_weight, k_bias)
        v = F.linear(words, attention.v_proj_weight, v_bias)
        q, k, v = (t.unflatten(-1, (heads, c // heads)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=word_mask[:, None, None, :])
        out = attention.out_proj(out.transpose(1, 2).reshape(b, height * width, c))
        return h + out.transpose(1, 2).reshape(b, c, height, width)


class GeneratorBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, style_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.affine1 = Affine(style_dim, out_channels)
        self.affine2 = Affine(style_dim, out_channels)
        self.skip = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # The first conv runs before upsampling: a quarter of the cost, for the same receptive field.
        x = F.leaky_relu(self.affine1(self.conv1(h), w), 0.2)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.leaky_relu(self.affine2(self.conv2(x), w), 0.2)
        return F.interpolate(self.skip(h), scale_factor=2.0, mode="nearest") + x


class Generator(nn.Module):
    """G(z, sentence, words) -> image in [-1, 1], [B, 3, R, R] with R = config.resolution."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.mapping = nn.Sequential(nn.Linear(config.z_dim + config.text_dim, config.style_dim), nn.LeakyReLU(0.2),
                                     nn.Linear(config.style_dim, config.style_dim), nn.LeakyReLU(0.2))
        self.start = nn.Linear(config.style_dim, c[0] * 16)
        self.blocks = nn.ModuleList(GeneratorBlock(c[i], c[i + 1], config.style_dim) for i in range(len(c) - 1))
        self.attentions = nn.ModuleDict({
            str(side): WordAttention(c[i], config.text_dim, config.heads)
            for i, side in ((i, 4 * 2**i) for i in range(len(c))) if side in config.attention_levels})
        self.to_rgb = nn.Conv2d(c[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor, sentence: torch.Tensor, words: torch.Tensor,
                word_mask: torch.Tensor) -> torch.Tensor:
        w = self.mapping(torch.cat([z, sentence], dim=1))
        h = self.start(w).view(len(z), self.config.channels[0], 4, 4)
        for block in self.blocks:
            h = block(h, w)
            attention = self.attentions[str(h.shape[-1])] if str(h.shape[-1]) in self.attentions else None
            if attention is not None:
                h = attention(h, words, word_mask)
        return torch.tanh(self.to_rgb(F.leaky_relu(h, 0.2)))


class DiscriminatorBlock(nn.Module):
    """DF-GAN's residual down block: a learned gamma (from 0) scales the residual branch."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # The second conv (the wider one) runs after pooling: a quarter of its cost.
        x = F.avg_pool2d(F.leaky_relu(self.conv1(h), 0.2), 2)
        x = F.leaky_relu(self.conv2(x), 0.2)
        return self.skip(F.avg_pool2d(h, 2)) + self.gamma * x


class Discriminator(nn.Module):
    """D(image, sentence) -> one logit per image (higher: a real image that matches its caption)."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.from_rgb = nn.Conv2d(3, c[0], 3, padding=1)
        self.blocks = nn.ModuleList(DiscriminatorBlock(c[i], c[i + 1]) for i in range(len(c) - 1))
        self.sentence = nn.Linear(config.text_dim, config.sentence_dim)
        self.joint = nn.Conv2d(c[-1] + config.sentence_dim, c[-1], 3, padding=1)
        self.out = nn.Linear(c[-1] * 16, 1)
        self.projection = nn.Linear(config.text_dim, c[-1])

    def forward(self, images: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        h = self.from_rgb(images)
        for block in self.blocks:
            h = block(h)
        h = F.leaky_relu(h, 0.2)
        s = self.sentence(sentence)[:, :, None, None].expand(-1, -1, *h.shape[2:])
        joint = F.leaky_relu(self.joint(torch.cat([h, s], dim=1)), 0.2)
        projection = (h.sum(dim=(2, 3)) * self.projection(sentence)).sum(dim=1) / h[0, 0].numel()
        return self.out(joint.flatten(1)).squeeze(1) + projection


# Initial weights from `seed` alone (the caller's random state is left as it was), as models/sizes.py builds.

def build_generator(size: str, text_dim: int, seed: int = 0) -> Generator:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Generator(GeneratorConfig(text_dim=text_dim, **gan_size(size)["g"]))


def build_discriminator(size: str, text_dim: int, seed: int = 0) -> Discriminator:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)   # not the generator's stream
        return Discriminator(DiscriminatorConfig(text_dim=text_dim, **gan_size(size)["d"]))


# ---- text features ------------------------------------------------------------------------------


@torch.no_grad()
def encode_text(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sentence [B, D], words [B, T, D], word_mask [B, T] bool) in float32; T = the longest caption's tokens.

    Under CLIP's causal mask a token's feature does not depend on the padding after it, so the features of
    a caption are the same whatever batch it is encoded in.
    """
    tokens = tokenizer(prompts, padding="longest", truncation=True, return_tensors="pt")
    with torch.autocast(device.type, enabled=False):
        out = text_encoder(tokens.input_ids.to(device))
    return out.pooler_output.float(), out.last_hidden_state.float(), tokens.attention_mask.to(device).bool()


def noise_for_seeds(seeds_or_generators: list, z_dim: int) -> torch.Tensor:
    """z [B, z_dim], one row per seed (or torch.Generator), drawn on the CPU so it is the same on any device."""
    rows = []
    for item in seeds_or_generators:
        generator = item if isinstance(item, torch.Generator) else torch.Generator().manual_seed(int(item))
        rows.append(torch.randn(z_dim, generator=generator, device=generator.device).cpu())
    return torch.stack(rows)


@torch.no_grad()
def generate_tensor(generator_model: Generator, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                    prompts: list[str], seeds_or_generators: list, device: torch.device,
                    compiled: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Images [B, 3, R, R] in [0, 1], float32 on the CPU; `compiled`: the generator compiled, run instead."""
    if len(prompts) != len(seeds_or_generators):
        raise BrushworkError(f"got {len(seeds_or_generators)} seeds for {len(prompts)} prompts")
    sentence, words, mask = encode_text(text_encoder, tokenizer, prompts, device)
    dtype = next(generator_model.parameters()).dtype
    z = noise_for_seeds(seeds_or_generators, generator_model.config.z_dim).to(device, dtype)
    if compiled is not None:  # padded to the longest caption the tokenizer takes: one package for every prompt
        pad = tokenizer.model_max_length - words.shape[1]
        words = torch.cat([words, words.new_zeros(len(words), pad, words.shape[2])], dim=1)
        mask = torch.cat([mask, mask.new_zeros(len(mask), pad)], dim=1)
    images = (compiled or generator_model)(z, sentence.to(dtype), words.to(dtype), mask)
    return (images.float() / 2 + 0.5).clamp(0, 1).cpu()


def gan_generate(generator_model: Generator, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 prompts: list[str], seeds: list[int], device: torch.device | str = "cpu") -> list[PIL.Image.Image]:
    """One image per (prompt, seed); the same seed and prompt always give the same image."""
    device = torch.device(device)
    was_training = generator_model.training
    generator_model.eval()
    try:
        return to_pil(generate_tensor(generator_model, text_encoder, tokenizer, prompts, seeds, device))
    finally:
        generator_model.train(was_training)


# ---- folder -----------------------------------------------------------------------------------------


def is_gan_folder(path: Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("brushwork_kind") == GAN_KIND
    except (OSError, ValueError, AttributeError):
        return False


def save_generator(generator_model: Generator, folder: Path) -> None:
    """config.json + model.safetensors into `folder` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"brushwork_kind": GAN_KIND, "_class_name": "Generator", **asdict(generator_model.config)}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_model(generator_model, str(folder / WEIGHTS_NAME))


def load_generator(folder: Path) -> Generator:
    folder = Path(folder)
    try:
        raw = json.loads((folder / "config.json").read_text())
        known = {f.name for f in fields(GeneratorConfig)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known}
        generator_model = Generator(GeneratorConfig(**values))
    except (OSError, ValueError, TypeError) as error:
        raise BrushworkError(f"{folder / 'config.json'} is not a readable GAN generator config: {error}") from None
    try:
        state = load_file(folder / WEIGHTS_NAME)
    except Exception as error:  # safetensors raises its own error type for a corrupt header
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BrushworkError(f"{folder / WEIGHTS_NAME}: cannot load the generator weights ({message}); "
                             "is the folder complete?") from None
    load_state("GAN generator", generator_model, state, folder / WEIGHTS_NAME)
    return generator_model.eval().requires_grad_(False)


def text_encoder_folder(folder: Path) -> Path:
    """The folder whose text_encoder/ and tokenizer/ condition the GAN in `folder`: the GAN folder itself, or
    the model its config.json names as "text_encoder_from" (shipped GANs share the diffusion model's encoder
    instead of carrying a second copy of the same weights)."""
    parts = ("tokenizer", "text_encoder")
    missing = [part for part in parts if not (folder / part).is_dir()]
    if not missing:
        return folder
    try:
        source = json.loads((folder / "config.json").read_text()).get("text_encoder_from")
    except (OSError, ValueError):
        source = None
    if not source:
        raise BrushworkError(f"GAN folder {folder} is missing its {', '.join(p + '/' for p in missing)}; train it "
                             "again with `brushwork train gan`, which copies them from the text model.")
    text_folder = resolve_model(source)
    if not all((text_folder / part).is_dir() for part in parts):
        raise BrushworkError(f"GAN folder {folder} takes its text encoder from {source!r}, which has no "
                             "text_encoder/ and tokenizer/.")
    return text_folder
