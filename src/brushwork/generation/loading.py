"""Loading a diffusion model: a diffusers Stable Diffusion folder (as `brushwork train` writes) or an SD single
file."""

import json
from functools import partial
from pathlib import Path
from typing import Callable

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from brushwork.errors import BrushworkError
from brushwork.generation.diffusion_model import DiffusionModel
from brushwork.generation.registry import check_model_exists
from brushwork.generation.single_file import load_single_file
from brushwork.models.loading import load_pretrained


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


def load_diffusion_model(path: Path, allow_pickle: bool = False) -> DiffusionModel:
    """The diffusion model behind a path: a diffusers SD folder or a single SD 1.x/2.x file."""
    check_model_exists(path)
    if path.is_file():
        return load_single_file(path, allow_pickle)
    if (path / "model_index.json").is_file():
        return _load_diffusers_folder(path)
    if (path / "config.json").is_file():
        raise BrushworkError(f"{path / 'config.json'}: this kind of model folder is not supported yet; "
                             "expected a Stable Diffusion folder with model_index.json")
    raise BrushworkError(f"{path} is not a model folder (no model_index.json); pass a folder written by "
                         "`brushwork train`, a diffusers Stable Diffusion folder, or a .safetensors file")


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' logs and progress bars (the CLI, server and Ray actors show their own)."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
