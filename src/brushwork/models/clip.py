"""Loading a model folder's clip/: the whole CLIPModel, or its vision half beside the model's text_encoder/.

The text tower of a brushwork CLIP is the same weights as the model's text_encoder/, so a shipped model
stores clip/ without it (scripts/ship_model.py) and this loader puts the two halves back together.
text_encoder/ may store its keys with the `text_model.` prefix (as shipped: every transformers version reads
that) or without it (as transformers 5 saves them).
"""

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel

from brushwork.errors import BrushworkError
from brushwork.models.loading import load_pretrained, load_state

TEXT_PREFIX = "text_model."
WEIGHTS_NAME = "model.safetensors"


def text_encoder_state(text_dir: Path) -> dict[str, torch.Tensor]:
    """text_encoder/'s weights, keys with the `text_model.` prefix whether the file has it or not."""
    return {key if key.startswith(TEXT_PREFIX) else TEXT_PREFIX + key: value
            for key, value in load_file(Path(text_dir) / WEIGHTS_NAME).items()}


def has_text_tower(clip_dir: Path) -> bool:
    with safe_open(str(Path(clip_dir) / WEIGHTS_NAME), "pt") as weights:
        return any(key.startswith(TEXT_PREFIX) for key in weights.keys())


def load_clip(clip_dir: Path) -> CLIPModel:
    """CLIPModel from `clip_dir`; when its weights lack the text tower, that comes from ../text_encoder/."""
    clip_dir = Path(clip_dir)
    if not (clip_dir / WEIGHTS_NAME).is_file() or has_text_tower(clip_dir):
        return load_pretrained("CLIP", CLIPModel, clip_dir)  # a whole CLIP, ours or anyone's
    text_dir = clip_dir.parent / "text_encoder"
    if not (text_dir / WEIGHTS_NAME).is_file():
        raise BrushworkError(f"{clip_dir} holds only CLIP's vision tower and there is no {text_dir}/{WEIGHTS_NAME} "
                             "to complete it with.")
    clip = CLIPModel(CLIPConfig.from_pretrained(clip_dir))
    state = load_file(clip_dir / WEIGHTS_NAME) | text_encoder_state(text_dir)
    load_state("CLIP", clip, {key: value.float() for key, value in state.items()}, clip_dir)
    return clip.eval()


def vision_only_state(clip_dir: Path) -> dict[str, torch.Tensor]:
    """clip/'s weights without the text tower, after checking that tower equals ../text_encoder/'s weights."""
    clip_dir = Path(clip_dir)
    state = load_file(clip_dir / WEIGHTS_NAME)
    text = {key: value for key, value in state.items() if key.startswith(TEXT_PREFIX)}
    if not text:
        return state  # already without it
    encoder = text_encoder_state(clip_dir.parent / "text_encoder")
    if text.keys() != encoder.keys() or any(not torch.equal(text[k].float(), encoder[k].float()) for k in text):
        raise BrushworkError(f"the text tower in {clip_dir} differs from {clip_dir.parent / 'text_encoder'}: "
                             "keep clip/ whole.")
    return {key: value for key, value in state.items() if not key.startswith(TEXT_PREFIX)}
