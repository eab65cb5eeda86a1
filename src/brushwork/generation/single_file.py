"""Stable Diffusion 1.x/2.x single files (.safetensors, or trusted .ckpt) into a DiffusionModel, offline.

Not diffusers' `from_single_file`: that takes the architecture from a config (a folder or the original YAML),
where this reads every shape from the weights themselves (so checkpoints of any SD-style size load), with the
shipped templates in assets/sd_configs only for what weights cannot show (head counts, scheduler, tokenizer).
"""

import json
from pathlib import Path

import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from brushwork.errors import BrushworkError
from brushwork.generation.diffusion_model import DiffusionModel
from brushwork.generation.registry import ASSETS_DIR

SD_CONFIG_DIR = ASSETS_DIR / "sd_configs"
CLIP_TOKENIZER_DIR = SD_CONFIG_DIR / "clip-tokenizer"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


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


def load_single_file(path: Path, allow_pickle: bool = False) -> DiffusionModel:
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
