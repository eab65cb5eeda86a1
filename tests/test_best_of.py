"""best_of: each image is the best of several candidates by the model's CLIP."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sd_tiny import add_tiny_clip, build_tiny_sd
from typer.testing import CliRunner

from brushwork.cli import app
from brushwork.errors import BrushworkError
from brushwork.generation.auto import BrushworkPipeline
from brushwork.generation.best_of import candidate_seed
from brushwork.pnginfo import read_parameters

SMALL = dict(num_inference_steps=3, height=32, width=32)
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny SD folder with a random tiny brushwork CLIP beside it, as `brushwork train` writes."""
    return add_tiny_clip(build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture(scope="module")
def pipe(model_dir) -> BrushworkPipeline:
    return BrushworkPipeline.from_pretrained(model_dir, device="cpu", dtype=torch.float32)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def clip_similarity(pipe: BrushworkPipeline, images, prompt: str) -> np.ndarray:
    text = torch.nn.functional.normalize(pipe.ranker.text_embeds([prompt]), dim=-1)
    return (torch.nn.functional.normalize(pipe.ranker.image_embeds(images), dim=-1) * text).sum(-1).numpy()


def test_keeps_the_candidate_clip_likes_best_and_records_its_seed(pipe):
    prompts = ["a red circle", "a blue square"]
    kept = pipe(prompts, seed=40, best_of=4, **SMALL)
    assert kept.extra == {"best_of": 4}
    for k, prompt in enumerate(prompts):
        seeds = [candidate_seed(40 + k, c) for c in range(4)]
        assert len(set(seeds)) == 4 and seeds[0] == 40 + k
        candidates = [pipe(prompt, seed=s, **SMALL).images[0] for s in seeds]
        scores = clip_similarity(pipe, candidates, prompt)
        best = int(scores.argmax())
        assert kept.seeds[k] == seeds[best]
        # The recorded seed remakes the kept image on its own, without reranking (up to batch-size rounding).
        assert np.abs(pixels(kept.images[k]) - pixels(candidates[best])).max() <= 2
    # Not always the first candidate: over several seeds the ranking picks others too.
    picks = pipe(["a red circle"] * 6, seed=100, best_of=3, **SMALL).seeds
    assert any(seed != 100 + k for k, seed in enumerate(picks))


def test_best_of_one_is_plain_sampling(pipe):
    plain, once = pipe("a red circle", seed=3, **SMALL), pipe("a red circle", seed=3, best_of=1, **SMALL)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(once.images[0])) and once.extra == {}


def test_best_of_with_a_caller_generator_draws_new_candidates(pipe):
    out = pipe(["a red circle"] * 2, generator=torch.Generator().manual_seed(1), best_of=3, **SMALL)
    assert out.seeds == [None, None] and len(out.images) == 2


@pytest.mark.parametrize("value", [0, 17, -1, 2.0, True])
def test_bad_best_of(pipe, value):
    with pytest.raises(BrushworkError, match="best_of must be a whole number from 1 to 16"):
        pipe("a red circle", best_of=value, **SMALL)


def test_a_model_without_a_clip_says_so_before_sampling(model_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("clip"))
    pipe = BrushworkPipeline.from_pretrained(bare, device="cpu", dtype=torch.float32)
    calls = []
    with pytest.raises(BrushworkError, match="has no clip/ folder"):
        pipe("a red circle", best_of=2, callback_on_step_end=lambda *args: calls.append(1), **SMALL)
    assert calls == []


def test_cli_best_of_png_records_it_and_from_remakes_the_kept_image(model_dir, tmp_path):
    out = tmp_path / "kept.png"
    result = runner.invoke(app, ["generate", "a red circle", "--model", str(model_dir), "--seed", "9", "--steps", "3",
                                 "--best-of", "3", "--no-watermark", "-o", str(out)])
    assert result.exit_code == 0, result.output
    stored = read_parameters(out)
    assert str(stored["best_of"]) == "3"
    again = tmp_path / "again.png"
    result = runner.invoke(app, ["generate", "--from", str(out), "--model", str(model_dir), "--no-watermark",
                                 "-o", str(again)])
    assert result.exit_code == 0, result.output
    assert "best_of" not in read_parameters(again) and read_parameters(again)["seed"] == stored["seed"]
    assert np.abs(pixels(read_image(out)) - pixels(read_image(again))).max() <= 2


def test_cli_bad_best_of_is_a_clear_error(model_dir, tmp_path):
    result = runner.invoke(app, ["generate", "a red circle", "--model", str(model_dir), "--best-of", "0",
                                 "-o", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "best_of must be a whole number" in result.output
    assert not (tmp_path / "x.png").exists()


def test_eval_best_of_notes_the_clip_bias(model_dir, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["eval", "--model", str(model_dir), "--data", "shapes", "--n", "1", "--steps", "2",
                                 "--best-of", "2", "--batch-sizes", "", "--train-images", "0", "--relation-probe", "0",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["best_of"] == 2
    assert any("best of 2" in warning for warning in report["warnings"])
    result = runner.invoke(app, ["eval", "--model", str(model_dir), "--best-of", "17", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "--best-of must be from 1 to 16" in result.output


def read_image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def test_served_best_of_keeps_the_same_images_with_their_seeds(model_dir, pipe, tmp_path):
    import io

    import PIL.Image
    from fastapi.testclient import TestClient
    from serve_helpers import wait_until

    from brushwork.pnginfo import parse_parameters
    from brushwork.serve.app import create_app
    from brushwork.serve.common import ServeConfig

    expected = pipe("a red circle", num_images_per_prompt=2, seed=5, best_of=3, **SMALL)
    config = ServeConfig(default_steps=3, preview_every=1, watermark=False)
    with TestClient(create_app(pipe, config)) as client:
        assert client.get("/v1/info").json()["limits"]["best_of"] == 8
        job_id = client.post("/v1/generate", json={"prompt": "a red circle", "n": 2, "seed": 5, "best_of": 3,
                                                   "width": 32, "height": 32}).json()["id"]
        wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] not in ("queued", "running"), 60)
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "succeeded", job
        assert job["request"]["best_of"] == 3 and job["progress"] == {"step": 9, "steps": 9}
        assert [image["seed"] for image in job["images"]] == expected.seeds
        for image, kept in zip(job["images"], expected.images):
            png = client.get(image["url"]).content
            stored = parse_parameters(PIL.Image.open(io.BytesIO(png)).info["parameters"])
            assert stored["seed"] == image["seed"] and str(stored["best_of"]) == "3"
            assert np.abs(pixels(PIL.Image.open(io.BytesIO(png)).convert("RGB")) - pixels(kept)).max() <= 2
        assert client.post("/v1/generate", json={"prompt": "x", "best_of": 9}).status_code == 422
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("clip"))
    bare_pipe = BrushworkPipeline.from_pretrained(bare, device="cpu", dtype=torch.float32)
    with TestClient(create_app(bare_pipe, config)) as client:
        assert client.get("/v1/info").json()["limits"]["best_of"] == 1   # the page hides its best-of box
        response = client.post("/v1/generate", json={"prompt": "x", "best_of": 2})
        assert response.status_code == 400 and response.json()["error"]["param"] == "best_of"
        assert "clip/" in response.json()["error"]["message"]
