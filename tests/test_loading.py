"""No component loads with weights left random: a key that does not fit stops the load with one Error: line."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from brushwork.cli import app
from brushwork.errors import BrushworkError
from brushwork.models.clip import load_clip
from brushwork.models.gan import build_generator, load_generator, save_generator
from brushwork.pipeline import SHIPPED_MODELS_DIR, BrushworkPipeline
from sd_tiny import add_tiny_clip, build_tiny_sd


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return add_tiny_clip(build_tiny_sd(tmp_path_factory.mktemp("tiny") / "model", "v1", seed=2))


def rename_key(weights_file, old_suffix: str, new_suffix: str) -> str:
    """Rename the first key ending in old_suffix; returns the new name."""
    state = load_file(weights_file)
    old = next(k for k in sorted(state) if k.endswith(old_suffix))
    new = old[: -len(old_suffix)] + new_suffix
    state[new] = state.pop(old)
    save_file(state, weights_file, metadata={"format": "pt"})
    return new


def broken_copy(model_dir, tmp_path, part: str, weights: str, old_suffix: str, new_suffix: str):
    folder = tmp_path / "broken"
    shutil.copytree(model_dir, folder)
    new = rename_key(folder / part / weights, old_suffix, new_suffix)
    return folder, new


def test_the_tiny_model_loads_whole(model_dir):
    BrushworkPipeline.from_pretrained(model_dir)
    load_clip(model_dir / "clip")


@pytest.mark.parametrize("part, weights, component", [
    ("text_encoder", "model.safetensors", "text encoder"),
    ("unet", "diffusion_pytorch_model.safetensors", "unet"),
    ("vae", "diffusion_pytorch_model.safetensors", "vae"),
])
def test_a_renamed_key_names_the_component_the_keys_and_the_versions(model_dir, tmp_path, part, weights, component):
    folder, new = broken_copy(model_dir, tmp_path, part, weights, "bias", "bias_renamed")
    with pytest.raises(BrushworkError) as error:
        BrushworkPipeline.from_pretrained(folder, device="cpu")
    message = str(error.value)
    assert f"the {component} in {folder / part}" in message
    assert "1 missing (" in message and f"1 unexpected ({new})" in message
    assert "transformers " in message and "diffusers " in message and "torch " in message
    assert "\n" not in message


def test_the_cli_says_it_in_one_error_line(model_dir, tmp_path):
    folder, new = broken_copy(model_dir, tmp_path, "text_encoder", "model.safetensors", "weight", "weight_x")
    result = CliRunner().invoke(app, ["generate", "a red circle", "--model", str(folder), "--steps", "2",
                                      "-o", str(tmp_path / "out.png")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "text encoder" in lines[0] and new in lines[0]
    assert "Traceback" not in result.output and not (tmp_path / "out.png").exists()


def test_many_keys_are_counted_and_a_few_shown(model_dir, tmp_path):
    folder = tmp_path / "prefixed"
    shutil.copytree(model_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({"old." + k: v for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    count = len(load_file(weights))
    with pytest.raises(BrushworkError, match=rf"{count} missing \([^)]*and {count - 3} more\)"):
        BrushworkPipeline.from_pretrained(folder)


def test_clip_vision_tower_with_a_renamed_key(model_dir, tmp_path):
    folder, new = broken_copy(model_dir, tmp_path, "clip", "model.safetensors", "logit_scale", "logit_scale_x")
    with pytest.raises(BrushworkError, match=rf"the CLIP in .*1 unexpected \({new}\)"):
        load_clip(folder / "clip")


def test_gan_generator_with_a_renamed_key(tmp_path):
    torch.manual_seed(0)
    save_generator(build_generator("tiny", 64), tmp_path / "gan")
    new = rename_key(tmp_path / "gan" / "model.safetensors", "weight", "weight_x")
    with pytest.raises(BrushworkError, match=rf"GAN generator .*1 missing .*1 unexpected \({new}\)"):
        load_generator(tmp_path / "gan")


@pytest.mark.parametrize("name", ["shapes", "emoji"])
def test_shipped_text_encoders_store_the_layout_every_transformers_reads(name):
    # transformers 5 saves CLIPTextModel without the text_model. prefix, and transformers 4 loads such a file
    # as random weights; with the prefix both load it.
    with safe_open(str(SHIPPED_MODELS_DIR / name / "text_encoder" / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
        assert {str(weights.get_slice(k).get_dtype()) for k in keys} == {"F16"}
    assert keys and all(key.startswith("text_model.") for key in keys)


def test_the_shipped_clip_has_the_vocabulary_files_transformers_4_reads():
    clip = SHIPPED_MODELS_DIR / "shapes" / "clip"
    tokenizer = SHIPPED_MODELS_DIR / "shapes" / "tokenizer"
    for name in ("vocab.json", "merges.txt"):
        assert (clip / name).read_bytes() == (tokenizer / name).read_bytes()
    assert json.loads((clip / "tokenizer.json").read_text())["model"]["vocab"] == json.loads(
        (clip / "vocab.json").read_text())
