import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from brushwork.cli import app
from sd_tiny import add_tiny_clip, build_tiny_sd

runner = CliRunner()
FAST = ["--steps", "2", "--per-prompt", "2", "--batch-sizes", "1,2", "--speed-repeats", "1", "--train-images", "0",
        "--relation-probe", "3"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRUSHWORK_CACHE", str(tmp_path / "cache"))   # the near-copy index of a data set


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random tiny SD folder (32 px) with a random tiny brushwork CLIP beside it, as `brushwork train` writes."""
    return add_tiny_clip(build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny"))


def _run(*args: str):
    return runner.invoke(app, ["eval", *args])


def test_eval_two_models_shapes_report(tiny_model, tmp_path):
    out = tmp_path / "report"
    # The same model under two names: same prompts and seeds must give the same numbers.
    result = _run("--model", str(tiny_model), "--model", str(tiny_model), "--data", "shapes", "--n", "2",
                  "--out", str(out), "--sweep", "steps=1,2", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())

    assert "CLIP" in report["feature_extractor"] and "bicubic" in report["resize_convention"]
    assert len(report["prompts"]) == 8                                   # 2 per task, 4 tasks
    assert any("FID" in w and "64" in w for w in report["warnings"])     # 16 images < 2 x 32-d features
    first, second = report["models"]
    assert second["name"] == "tiny (2)"
    values = first["metrics"]
    for key in ("fid", "kid_mean", "kid_std", "clip_score", "retrieval_top1", "precision", "recall", "density",
                "coverage", "intra_prompt_diversity", "seconds_per_image"):
        assert isinstance(values[key], float), key
    assert values["n_images"] == 16 and values["fid"] >= 0 and 0 <= values["clip_score"] <= 100
    assert values["retrieval_top5"] is not None                          # 8 prompts > 5
    assert set(first["faithfulness"]) == {"single", "two_objects", "counting", "position", "position_relation",
                                          "overall"}
    overall = first["faithfulness"]["overall"]
    assert overall["n"] == 16 and overall["low"] <= overall["accuracy"] <= overall["high"]
    for key in ("fid", "clip_score", "precision", "intra_prompt_diversity"):
        assert second["metrics"][key] == pytest.approx(values[key])

    speed = first["speed"]
    assert set(speed["throughput"]) == {"1", "2"}
    assert speed["latency_seconds_per_image"] > 0 and speed["flops_per_image"] > 0
    assert speed["peak_rss_bytes"] > 0 and 0 < speed["fraction_of_peak"]
    assert [p["value"] for p in first["sweeps"]["steps"]] == [1, 2]
    assert first["sweeps"]["steps"][1]["metrics"]["fid"] == pytest.approx(values["fid"])   # steps=2 is the base

    probe = first["relation_probe"]
    assert probe["images"] == 3 and probe["timesteps"] == [500, 800, 950]
    assert set(probe["shares"]["950"]) == {"opposite relation", "perpendicular relation", "objects swapped",
                                           "colour (control)"}
    assert second["relation_probe"] == probe                             # same model, same scenes and noise
    assert "relation probe" in result.output
    for name in ("grid_0.png", "grid_1.png", "faithfulness.png", "sweep_steps.png"):
        assert (out / name).stat().st_size > 0, name
    page = (out / "report.html").read_text()
    assert "tiny (2)" in page and "data:image/png;base64," in page
    assert "<h2>Relation probe</h2>" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_eval_folder_data(tiny_model, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    from PIL import Image

    lines = []
    for i, color in enumerate(["red", "green", "blue", "yellow", "purple", "orange", "black"]):
        Image.new("RGB", (48, 40), color).save(folder / f"{i}.png")     # not square, not 32 px
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a {color} square"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = _run("--model", str(tiny_model), "--data", str(folder), "--n", "7", "--out", str(out),
                  "--steps", "1", "--per-prompt", "1", "--batch-sizes", "")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    model = report["models"][0]
    assert model["faithfulness"] is None and model["speed"] is None
    assert model["metrics"]["intra_prompt_diversity"] is None
    assert any("--per-prompt" in w for w in report["warnings"])
    assert (out / "report.html").exists()


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "model not found"),
    (["--data", "nosuchdata"], "unknown data set"),
    (["--sweep", "temperature=1,2"], "--sweep"),
    (["--sweep", "steps=a,b"], "must be int"),
    (["--batch-sizes", "0,4"], "between 1 and 64"),
    (["--sweep", "steps=0,4"], "at least 1"),
    (["--sweep", "sampler=nosuch"], "unknown sampler"),
    (["--inception-weights", "/nonexistent/inception.pth"], "no such file"),
    (["--relation-probe", "-1"], "--relation-probe must be at least 0"),
])
def test_eval_bad_input_is_a_clean_error(tiny_model, tmp_path, args, message):
    model = [] if "--model" in args else ["--model", str(tiny_model)]
    result = _run(*model, "--out", str(tmp_path / "out"), *FAST, *args)   # later options win
    assert result.exit_code == 1
    assert "Error" in result.output and message in result.output
    assert "Traceback" not in result.output


def test_eval_model_without_clip(tiny_model, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare, ignore=shutil.ignore_patterns("clip"))
    result = _run("--model", str(bare), "--out", str(tmp_path / "out"), *FAST)
    assert result.exit_code == 1 and "--clip" in result.output


def test_real_images_scored_against_themselves(tiny_model):
    """The metric plumbing end to end without a generator: rendered shapes judged as if generated."""
    from brushwork.data.shapes import ShapesDataset
    from brushwork.eval.features import ClipEmbedder
    from brushwork.eval.run import Reference, quality_metrics

    items = [ShapesDataset(n=24, seed=5)[i] for i in range(24)]
    items = list({item["text"]: item for item in items}.values())        # one image per distinct prompt
    images, prompts = [item["image"] for item in items], [item["text"] for item in items]
    tasks = [item["scene"].task for item in items]
    embedder = ClipEmbedder(tiny_model / "clip", tiny_model / "tokenizer")
    ref = Reference(prompts, tasks, embedder.text_embeds(prompts), embedder.image_embeds(images), embedder, embedder, 1)
    values, faithfulness, passed = quality_metrics(images, ref)
    assert values["fid"] == pytest.approx(0.0, abs=1e-3)
    assert values["precision"] == values["recall"] == values["coverage"] == 1.0
    assert all(passed) and faithfulness["overall"]["accuracy"] == 1.0    # the checker accepts true renders
    assert faithfulness["overall"]["n"] == len(images)
    assert set(faithfulness) == set(tasks) | {"overall", "position_relation"}
    relation = faithfulness["position_relation"]                       # every position image has both objects
    assert relation["n"] == tasks.count("position") > 0 and relation["accuracy"] == 1.0


def test_position_relation_counts_only_images_whose_objects_are_right():
    from brushwork.data.shapes import Scene, ShapeObject, render
    from brushwork.eval.run import _faithfulness

    image = render(Scene((ShapeObject("red", "circle", 20, 30, 6), ShapeObject("blue", "square", 45, 30, 8)),
                         "a red circle left of a blue square", "position"))
    prompts = ["a red circle left of a blue square", "a red circle right of a blue square",
               "a red circle above a blue square", "a green circle left of a blue square", "a red circle"]
    result, passed = _faithfulness([image] * 5, prompts, ["position"] * 4 + ["single"])
    assert passed == [True, False, False, False, False]
    assert result["position"]["accuracy"] == 0.25 and result["position"]["n"] == 4
    assert result["position_relation"]["n"] == 3 and result["position_relation"]["accuracy"] == pytest.approx(1 / 3)
    assert result["overall"]["n"] == 5
    no_position, _ = _faithfulness([image], ["a red circle"], ["single"])
    assert "position_relation" not in no_position


def test_eval_with_layout_guidance_records_it_and_samples_a_gan_without_it(tiny_model, tmp_path):
    out = tmp_path / "report"
    result = _run("--model", str(tiny_model), "--model", "shapes-gan", "--data", "shapes", "--n", "1", "--layout",
                  "--out", str(out), "--steps", "2", "--per-prompt", "1", "--batch-sizes", "", "--train-images", "0",
                  "--relation-probe", "2")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["layout"] is True
    diffusion, gan = report["models"]
    assert diffusion["layout"] is True and gan["layout"] is False
    assert any("layout guidance needs a diffusion model: shapes-gan" in w for w in report["warnings"])
    assert diffusion["relation_probe"]["images"] == 2 and gan["relation_probe"] is None
    assert any("relation probe" in w and "shapes-gan is not probed" in w for w in report["warnings"])
