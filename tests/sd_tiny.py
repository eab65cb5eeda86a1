"""Tiny random Stable Diffusion models for tests (no downloads).

build_tiny_sd() writes a diffusers StableDiffusionPipeline folder shaped like SD 1.x ("v1": CLIP text
encoder, conv attention projections, epsilon) or SD 2.x ("v2": OpenCLIP-style text encoder, linear
projections, v-prediction). to_original_checkpoint() turns such a folder into the original CompVis/LDM
single-file key layout, the inverse of diffusers' single-file converters. add_tiny_clip() puts a random tiny
brushwork CLIP beside a folder's model. build_tiny_lcm() makes build_tiny_sd's model a few-step one, laid out as
`brushwork train distill` writes it.
"""

import json
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, LatentConsistencyModelPipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from brushwork.generation.single_file import CLIP_TOKENIZER_DIR


def _bytes_to_unicode() -> list[str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_tokenizer(path: Path) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (byte symbols, their word-final forms, a few merges, specials)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>"]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(path)
    return tokenizer


def build_tiny_sd(path: Path, version: str = "v1", clip_vocab: bool = False, seed: int = 0) -> Path:
    """Write a random tiny SD-shaped diffusers folder: 32 px images, 8x8 latents (VAE factor 4).

    clip_vocab=True uses the real CLIP tokenizer shipped with brushwork (49408 tokens), as single-file
    loading needs; otherwise a tiny character-level tokenizer is built.
    """
    path = Path(path)
    torch.manual_seed(seed)
    if clip_vocab:
        tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, model_max_length=77,
                                                  pad_token="!" if version == "v2" else "<|endoftext|>")
    else:
        tokenizer = write_tiny_tokenizer(path / "_tokenizer_build")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=1, max_position_embeddings=77, projection_dim=64,
        hidden_act="quick_gelu" if version == "v1" else "gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )).eval()
    channels = (32, 64) if version == "v1" else (64, 128)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8 if version == "v1" else [c // 64 for c in channels],
        use_linear_projection=version == "v2",
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    ).eval()
    # Random init leaves some layers near zero; jitter every weight so each part of the model matters.
    with torch.no_grad():
        for module in (unet, vae):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, set_alpha_to_one=False, clip_sample=False,
        prediction_type="epsilon" if version == "v1" else "v_prediction",
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    if not clip_vocab:
        for f in (path / "_tokenizer_build").iterdir():
            f.unlink()
        (path / "_tokenizer_build").rmdir()
    return path


def add_tiny_clip(path: Path) -> Path:
    """A random tiny brushwork CLIP in path/clip, beside the model's tokenizer, as `brushwork train` writes one."""
    from brushwork.models.sizes import build_clip, get_size

    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    torch.manual_seed(0)
    build_clip(get_size("tiny"), len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id).save_pretrained(
        path / "clip")
    return path


def build_tiny_lcm(path: Path, version: str = "v1") -> Path:
    """build_tiny_sd's model with the student UNet and LCMScheduler of `brushwork train distill`, untrained: its
    guidance projection is random (not zero, as distillation starts it), so that the guidance changes the image."""
    from brushwork.train.distill import student_unet
    from brushwork.train.stages import lcm_scheduler

    sd = StableDiffusionPipeline.from_pretrained(build_tiny_sd(path, version))
    unet = student_unet(sd.unet)
    torch.manual_seed(1)
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.normal_(0.0, 0.1)
    LatentConsistencyModelPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet,
                                   scheduler=lcm_scheduler(dict(sd.scheduler.config), 50), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False).save_pretrained(path)
    return path


# ---- diffusers folder -> original (CompVis/LDM) single-file keys ----------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_key(key: str, config: dict) -> str:
    per_level = config["layers_per_block"] + 1
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for old, new in top.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    parts = key.split(".")
    if parts[0] == "down_blocks":
        level = int(parts[1])
        if parts[2] == "downsamplers":
            return f"input_blocks.{per_level * (level + 1)}.0.op." + ".".join(parts[5:])
        block = f"input_blocks.{per_level * level + int(parts[3]) + 1}"
    elif parts[0] == "up_blocks":
        level = int(parts[1])
        if parts[2] == "upsamplers":
            has_attention = config["up_block_types"][level].startswith("CrossAttn")
            return (f"output_blocks.{per_level * level + per_level - 1}.{2 if has_attention else 1}.conv."
                    + ".".join(parts[5:]))
        block = f"output_blocks.{per_level * level + int(parts[3])}"
    elif parts[0] == "mid_block":
        block = "middle_block.1" if parts[1] == "attentions" else f"middle_block.{2 * int(parts[2])}"
        rest = parts[3:]
        if parts[1] == "resnets":
            rest = [_RESNET.get(rest[0], rest[0])] + rest[1:]
        return block + "." + ".".join(rest)
    else:
        raise KeyError(key)
    rest = parts[4:]
    if parts[2] == "resnets":
        return f"{block}.0." + ".".join([_RESNET.get(rest[0], rest[0])] + rest[1:])
    return f"{block}.1." + ".".join(rest)


def _vae_key(key: str, tensor: torch.Tensor, levels: int) -> tuple[str, torch.Tensor]:
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    parts = key.split(".")
    if parts[1] == "mid_block":
        if parts[2] == "attentions":
            name = ".".join(parts[4:-1])
            key = f"{parts[0]}.mid.attn_1.{attention[name]}.{parts[-1]}"
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        else:
            key = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
    elif parts[1] in ("down_blocks", "up_blocks"):
        level = int(parts[2]) if parts[1] == "down_blocks" else levels - 1 - int(parts[2])
        node = "down" if parts[1] == "down_blocks" else "up"
        if parts[3] == "resnets":
            key = f"{parts[0]}.{node}.{level}.block.{parts[4]}." + ".".join(parts[5:])
        else:
            sampler = "downsample" if parts[3] == "downsamplers" else "upsample"
            key = f"{parts[0]}.{node}.{level}.{sampler}." + ".".join(parts[5:])
    return key, tensor


def to_original_checkpoint(folder: Path, version: str = "v1") -> dict[str, torch.Tensor]:
    """State dict of a diffusers SD folder in the original single-file layout (SD2: one extra text layer)."""
    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    out = {}
    for key, value in unet.state_dict().items():
        out["model.diffusion_model." + _unet_key(key, dict(unet.config))] = value
    levels = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        new_key, value = _vae_key(key, value, levels)
        out["first_stage_model." + new_key] = value
    text = text_encoder.state_dict()
    if version == "v1":
        for key, value in text.items():
            out["cond_stage_model.transformer.text_model." + key] = value
        return {k: v.contiguous() for k, v in out.items()}
    prefix = "cond_stage_model.model."
    out[prefix + "token_embedding.weight"] = text["embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = text["embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = text["final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = text["final_layer_norm.bias"]
    hidden = text_encoder.config.hidden_size
    out[prefix + "text_projection"] = torch.randn(hidden, hidden)
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    layers = text_encoder.config.num_hidden_layers
    # SD 2.x runs OpenCLIP's penultimate layer: the file holds one more block than the model uses.
    for i in range(layers + 1):
        block = f"{prefix}transformer.resblocks.{i}."
        if i == layers:
            source = {k.replace(f"encoder.layers.{i - 1}.", ""): torch.randn_like(v)
                      for k, v in text.items() if k.startswith(f"encoder.layers.{i - 1}.")}
        else:
            source = {k.replace(f"encoder.layers.{i}.", ""): v
                      for k, v in text.items() if k.startswith(f"encoder.layers.{i}.")}
        for kind in ("weight", "bias"):
            out[block + f"attn.in_proj_{kind}"] = torch.cat(
                [source[f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            for old, new in names.items():
                out[block + f"{new}.{kind}"] = source[f"{old}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}
