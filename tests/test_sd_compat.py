"""Stable Diffusion 1.x / 2.x compatibility: diffusers folders and original single files, offline."""

import numpy as np
import pytest
import safetensors.torch
import torch
from sd_tiny import build_tiny_sd, to_original_checkpoint

from brushwork.errors import BrushworkError
from brushwork.generation.auto import BrushworkPipeline

SMALL = dict(num_inference_steps=4, height=32, width=32, seed=3)


@pytest.fixture(scope="module", params=["v1", "v2"])
def sd(request, tmp_path_factory):
    version = request.param
    root = tmp_path_factory.mktemp(f"sd-{version}")
    folder = build_tiny_sd(root / "folder", version, clip_vocab=True)
    state = to_original_checkpoint(folder, version)
    single = root / f"tiny-{version}.safetensors"
    safetensors.torch.save_file(state, single)
    reference = BrushworkPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    image = np.asarray(reference("a red circle", **SMALL).images[0], dtype=np.int16)
    return {"version": version, "root": root, "folder": folder, "state": state, "single": single,
            "image": image, "prediction": reference.model.scheduler_config["prediction_type"]}


def image_of(path, **kwargs) -> np.ndarray:
    pipe = BrushworkPipeline.from_pretrained(path, device="cpu", dtype=torch.float32, **kwargs)
    return np.asarray(pipe("a red circle", **SMALL).images[0], dtype=np.int16)


def test_single_safetensors_equals_folder(sd):
    pipe = BrushworkPipeline.from_pretrained(sd["single"], device="cpu", dtype=torch.float32)
    assert pipe.model.scheduler_config["prediction_type"] == sd["prediction"]
    assert pipe.model.unet.config.use_linear_projection == (sd["version"] == "v2")
    image = np.asarray(pipe("a red circle", **SMALL).images[0], dtype=np.int16)
    assert image.std() > 5
    assert np.abs(image - sd["image"]).max() <= 2


def test_pickle_checkpoint_needs_permission(sd):
    ckpt = sd["root"] / "tiny.ckpt"
    torch.save({"state_dict": sd["state"]}, ckpt)
    with pytest.raises(BrushworkError, match="allow-pickle"):
        BrushworkPipeline.from_pretrained(ckpt)
    assert np.abs(image_of(ckpt, allow_pickle=True) - sd["image"]).max() <= 2


def test_broken_single_files(sd):
    if sd["version"] == "v2":
        pytest.skip("the same checks for both versions; run once")
    root = sd["root"]
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(sd["single"].read_bytes()[:5000])
    with pytest.raises(BrushworkError, match="truncated or corrupt"):
        BrushworkPipeline.from_pretrained(truncated)

    wrong = dict(sd["state"])
    key = "model.diffusion_model.out.2.weight"
    wrong[key] = torch.zeros(4, 16, 3, 3)
    safetensors.torch.save_file(wrong, root / "wrong.safetensors")
    with pytest.raises(BrushworkError, match="wrong shape"):
        BrushworkPipeline.from_pretrained(root / "wrong.safetensors")

    missing = {k: v for k, v in sd["state"].items() if "decoder.up.0" not in k}
    safetensors.torch.save_file(missing, root / "missing.safetensors")
    with pytest.raises(BrushworkError, match="vae weights do not fit"):
        BrushworkPipeline.from_pretrained(root / "missing.safetensors")

    safetensors.torch.save_file({"weight": torch.zeros(2)}, root / "other.safetensors")
    with pytest.raises(BrushworkError, match="not a Stable Diffusion"):
        BrushworkPipeline.from_pretrained(root / "other.safetensors")

    (root / "model.onnx").write_bytes(b"x")
    with pytest.raises(BrushworkError, match="unknown model file type"):
        BrushworkPipeline.from_pretrained(root / "model.onnx")
