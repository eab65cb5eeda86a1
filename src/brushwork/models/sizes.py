"""Named model sizes: each is plain config for transformers/diffusers classes, plus default step counts.

- `tiny`: for tests; the whole recipe trains in seconds.
- `compact`: `small` with a 2-layer text tower and one ResNet per UNet level (about 20 MB in fp16, against
  27 MB): for a second shipped model where the package's bytes count.
- `small`: the shipped model; trains on a 2-core CPU in a few hours.
- `base`: for a GPU.

All sizes work on 64×64 RGB images: the VAE maps them to 4×16×16 latents (two downsamplings) and the
UNet cross-attends to the CLIP text tower's hidden states. Cross-attention sits at the 8×8 and 4×4
levels only: on a CPU, attention over the 256 tokens of the 16×16 level costs 2–4× the step time.
"""

from dataclasses import dataclass, field, replace

import torch

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel

from brushwork.errors import BrushworkError


@dataclass(frozen=True)
class ModelSize:
    name: str
    resolution: int
    clip_text: dict          # CLIPTextConfig kwargs (vocab and special token ids come from the tokenizer)
    clip_vision: dict        # CLIPVisionConfig kwargs
    projection_dim: int
    vae: dict                # AutoencoderKL kwargs
    unet: dict               # UNet2DConditionModel kwargs (cross_attention_dim comes from clip_text)
    steps: dict = field(default_factory=dict)   # default optimizer steps per stage: clip, vae, unet
    # images per optimizer step, per stage. The VAE takes small batches: at 16 it reached 95% exact reconstructions
    # in 6 minutes on 2 CPU cores (900 steps), at 64 3% (200 steps), for about the same images seen.
    batch_sizes: dict = field(default_factory=dict)

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae["block_out_channels"]) - 1)


def _unet(channels: tuple[int, ...], layers: int, heads: tuple[int, ...], pooling_heads: int) -> dict:
    # Plain ResNet blocks at 16×16, cross-attention at every lower level, and in the middle block.
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1)
    up = ("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",)
    return dict(
        # The text, attention-pooled, is added to the timestep embedding (Imagen's pooled conditioning), so it
        # reaches every ResNet block, the 16×16 ones included, not only the cross-attention levels: without it
        # the small UNet's output hardly depended on the prompt (1.4% change at t=900 after 2,500 steps).
        # diffusers computes it from encoder_hidden_states, so StableDiffusionPipeline runs such a UNet as is.
        addition_embed_type="text",
        addition_embed_type_num_heads=pooling_heads,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=layers,
        # diffusers reads attention_head_dim as the number of heads per block (a historical misnomer).
        attention_head_dim=heads,
        norm_num_groups=min(32, channels[0]),
    )


def _vae(channels: tuple[int, ...], layers: int, groups: int) -> dict:
    # Few groups per GroupNorm: with one channel per group (32 groups of 32 channels) the small VAE mixed up
    # colours (red/yellow → orange) — 8 groups reached 35% exact shapes-checker passes where 32 reached 10%
    # after the same number of steps.
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=groups,
    )


_SMALL = ModelSize(
    name="small",
    resolution=64,
    clip_text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    clip_vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=4, patch_size=8),
    projection_dim=256,
    vae=_vae((32, 64, 128), layers=1, groups=8),
    unet=_unet((32, 64, 128), layers=2, heads=(1, 2, 4), pooling_heads=4),
    steps=dict(clip=2000, vae=2000, unet=10000),
    batch_sizes=dict(clip=64, vae=16, unet=64),
)

SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(
        name="tiny",
        resolution=64,
        clip_text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        clip_vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, patch_size=16),
        projection_dim=32,
        vae=_vae((8, 16, 16), layers=1, groups=4),
        unet=_unet((16, 32), layers=1, heads=(2, 2), pooling_heads=2),
        steps=dict(clip=4, vae=4, unet=6),
        batch_sizes=dict(clip=8, vae=8, unet=8),
    ),
    # small with a 2-layer text tower and one ResNet block per UNet level
    "compact": replace(_SMALL, name="compact", clip_text=dict(_SMALL.clip_text, num_hidden_layers=2),
                       unet=_unet((32, 64, 128), layers=1, heads=(1, 2, 4), pooling_heads=4)),
    "small": _SMALL,
    "base": ModelSize(
        name="base",
        resolution=64,
        clip_text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8),
        clip_vision=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=8, patch_size=8),
        projection_dim=512,
        vae=_vae((64, 128, 256), layers=2, groups=32),
        unet=_unet((128, 256, 512), layers=2, heads=(4, 8, 16), pooling_heads=8),
        steps=dict(clip=20000, vae=20000, unet=100000),
        batch_sizes=dict(clip=256, vae=256, unet=256),
    ),
}


def get_size(name: str) -> ModelSize:
    if name not in SIZES:
        raise BrushworkError(f"unknown model size {name!r}: choose one of {', '.join(SIZES)}.")
    return SIZES[name]


def clip_config(size: ModelSize, vocab_size: int, bos_token_id: int, eos_token_id: int) -> CLIPConfig:
    # The text tower reads 77 positions, as diffusers' pipelines pad prompts to the tokenizer's length.
    text = dict(size.clip_text, vocab_size=vocab_size, max_position_embeddings=77,
                bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    vision = dict(size.clip_vision, image_size=size.resolution, num_channels=3)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=size.projection_dim)


# Each builder draws its initial weights from `seed` alone (the caller's random state is left as it was), so the
# same command and seed train the same weights.

def build_clip(size: ModelSize, vocab_size: int, bos_token_id: int | None = None,
               eos_token_id: int | None = None, seed: int = 0) -> CLIPModel:
    """A fresh CLIPModel. Token ids default to the layout of brushwork.tokenizer (start, end last)."""
    bos_token_id = vocab_size - 2 if bos_token_id is None else bos_token_id
    eos_token_id = vocab_size - 1 if eos_token_id is None else eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(clip_config(size, vocab_size, bos_token_id, eos_token_id))


def build_vae(size: ModelSize, seed: int = 0) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**size.vae, sample_size=size.resolution)


def build_unet(size: ModelSize, seed: int = 0) -> UNet2DConditionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**size.unet, sample_size=size.latent_size,
                                    cross_attention_dim=size.clip_text["hidden_size"])


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
