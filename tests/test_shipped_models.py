"""The models shipped inside the package: installed, small, safe to load, offline, and drawing what they are asked."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import brushwork
from brushwork.cli import app
from brushwork.data.dataset import emoji_folder
from brushwork.eval.checker import check, detect_objects
from brushwork.generation.auto import BrushworkPipeline
from brushwork.generation.registry import SHIPPED_MODELS_DIR, shipped_models
from brushwork.pnginfo import read_parameters

PACKAGE = Path(brushwork.__file__).parent
SINGLE = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple square",
          "a orange triangle", "a large blue circle", "a small red square"]


@pytest.fixture(scope="module")
def default_pipe():
    return BrushworkPipeline.from_pretrained()


def test_shapes_diffusion_gan_and_emoji_are_installed():
    assert {"shapes", "shapes-gan", "emoji"} <= set(shipped_models())


def test_the_package_stays_under_60_mb():
    size = sum(p.stat().st_size for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert size < 60e6, f"the package holds {size / 1e6:.1f} MB"


def test_shipped_weights_are_safetensors_only():
    suffixes = {p.suffix for p in SHIPPED_MODELS_DIR.rglob("*") if p.is_file()}
    assert ".safetensors" in suffixes and not suffixes & {".bin", ".ckpt", ".pt", ".pth", ".pkl"}
    assert not list(SHIPPED_MODELS_DIR.rglob("runs"))   # no checkpoints, logs or samples


@pytest.mark.parametrize("name, data", [("shapes", "shapes"), ("shapes-gan", "shapes"), ("emoji", "emoji")])
def test_model_cards_say_how_the_model_was_trained(name, data):
    folder = SHIPPED_MODELS_DIR / name
    facts = json.loads((folder / "training.json").read_text())
    card = (folder / "README.md").read_text()
    assert facts["commands"] and all(command in card for command in facts["commands"])
    assert facts["data"] == data


def test_default_model_follows_single_object_prompts(default_pipe):
    # The shipped model passes about three fifths of single-object prompts exactly (README; seed 0 here: six of
    # these eight); what it gets right far more often is the shape. Its misses are near misses: at most one of
    # these eight images would pass for a prompt of another colour and another shape.
    images = default_pipe(SINGLE, seed=0).images
    assert all(image.size == (64, 64) for image in images)
    exact = [prompt for image, prompt in zip(images, SINGLE) if check(image, prompt).ok]
    largest = [max(detect_objects(image), key=lambda o: o.area, default=None) for image in images]
    right_shape = [p for p, o in zip(SINGLE, largest) if o is not None and o.shape == p.split()[-1]]
    wrong_prompt_passes = [(prompt, other) for image, prompt in zip(images, SINGLE) for other in SINGLE
                           if other.split()[-2:] != prompt.split()[-2:] and other.split()[-1] != prompt.split()[-1]
                           and check(image, other).ok]
    assert len(exact) >= 4, f"only {exact} drawn exactly"
    assert len(right_shape) >= 6, f"the largest object has the asked shape only for {right_shape}"
    assert len(wrong_prompt_passes) <= 1, wrong_prompt_passes


def test_default_model_is_deterministic_for_a_seed(default_pipe):
    a = default_pipe("a red circle above a blue square", seed=11).images[0]
    b = default_pipe("a red circle above a blue square", seed=11).images[0]
    c = default_pipe("a red circle above a blue square", seed=12).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))


def test_every_deterministic_sampler_reaches_the_same_image(default_pipe):
    # DDIM and DPM++ solve the same ODE from the same noise, so they end near the same image. DDIM's own default
    # clip_sample=True clips the latents to [-1, 1]: with it the object faded into the white (mean difference 5.4).
    dpm = np.asarray(default_pipe("a red circle", seed=3, sampler="dpm++").images[0], dtype=np.int16)
    ddim = np.asarray(default_pipe("a red circle", seed=3, sampler="ddim").images[0], dtype=np.int16)
    assert np.abs(dpm - ddim).mean() < 2


def test_shipped_gan_draws_in_one_step():
    pipe = BrushworkPipeline.from_pretrained("shapes-gan")
    assert pipe.model.kind == "gan"
    first = pipe(["a red circle", "a blue square"], seed=0).images
    again = pipe(["a red circle", "a blue square"], seed=0).images
    assert [i.size for i in first] == [(64, 64)] * 2
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))


def test_generate_works_right_after_install_without_model(tmp_path):
    out = tmp_path / "out.png"
    result = CliRunner().invoke(app, ["generate", "a red circle above a blue square", "--seed", "7", "-o", str(out)])
    assert result.exit_code == 0, result.output
    params = read_parameters(out)
    assert params["model"] == "shapes" and params["steps"] == 20 and params["seed"] == 7


def test_emoji_model_draws_the_emoji_it_is_named(tmp_path, monkeypatch):
    # Recognisable means: each image is nearer in pixels to the OpenMoji of its own name than to the other
    # three's (README: 13 of 16 names give their own emoji's nearest image among all 3,953).
    monkeypatch.setenv("BRUSHWORK_CACHE", str(tmp_path))
    names = ["grinning face", "rocket", "sun", "unicorn"]
    images = BrushworkPipeline.from_pretrained("emoji")(names, seed=0).images
    folder = emoji_folder(64)
    files = {item["text"]: item["file_name"] for item in map(json.loads, (folder / "metadata.jsonl").open())}
    originals = [np.asarray(Image.open(folder / files[name]).convert("RGB"), np.float32) for name in names]
    for name, image in zip(names, images):
        distances = [((np.asarray(image, np.float32) - original) ** 2).sum() for original in originals]
        assert names[int(np.argmin(distances))] == name, (name, distances)
