"""Creativity in `brushwork eval`: the blockwise nearest-neighbour search, the cached training index, the copy
rate, seen against held-out faithfulness, the report's Creativity section and its data-set check."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ImageFilter
from typer.testing import CliRunner

from brushwork.cli import app
from brushwork.data.dataset import open_dataset
from brushwork.data.holdout import HoldOut
from brushwork.eval import creativity, memorisation
from brushwork.eval.features import ClipEmbedder
from sd_tiny import add_tiny_clip, build_tiny_sd

runner = CliRunner()
HOLD_OUT = "purple triangle,four circles"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRUSHWORK_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return add_tiny_clip(build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture(scope="module")
def embedder(tiny_model) -> ClipEmbedder:
    return ClipEmbedder(tiny_model / "clip", tiny_model / "tokenizer")


def test_blockwise_search_is_exact_and_leaves_out_the_excluded_row(monkeypatch):
    monkeypatch.setattr(memorisation, "SEARCH_BLOCK", 7)      # many blocks, a short last one
    generator = torch.Generator().manual_seed(0)
    index = memorisation.unit(torch.randn(50, 16, generator=generator)).numpy()
    queries = memorisation.unit(torch.randn(9, 16, generator=generator))
    distances, rows = memorisation.nearest(queries, index, k=5)
    expected = (1 - queries @ torch.from_numpy(index).T).sort(dim=1)
    assert torch.equal(rows, expected.indices[:, :5])
    assert torch.allclose(distances, expected.values[:, :5], atol=1e-6)

    own = torch.tensor([3, 10, 49])
    distances, rows = memorisation.nearest(torch.from_numpy(index[own.numpy()]), index, k=4, exclude=own)
    assert not (rows == own[:, None]).any() and (distances > 1e-4).all()
    assert memorisation.nearest(queries, index[:3], k=8, exclude=torch.tensor([0] * 9))[1].shape == (9, 2)


def test_index_is_built_once_per_data_set_and_clip(embedder, tmp_path):
    data = open_dataset("shapes", 32, n=40, seed=1)
    key = memorisation.index_key(data, "clip-a", 32)
    built = memorisation.build_index(data, embedder, key)
    assert built.seconds > 0 and built.embeddings.shape == (40, embedder.dim)
    assert np.allclose(np.linalg.norm(built.embeddings, axis=1), 1, atol=1e-5)
    again = memorisation.build_index(data, embedder, key)
    assert again.seconds == 0 and again.path == built.path and np.array_equal(again.embeddings, built.embeddings)
    assert not list(built.path.parent.glob("*partial*"))
    other_draw = open_dataset("shapes", 32, n=40, seed=2)
    assert memorisation.index_key(other_draw, "clip-a", 32) != key
    assert memorisation.index_key(data, "clip-b", 32) != key


def test_training_images_are_copies_and_fresh_scenes_mostly_not(embedder):
    data = open_dataset("shapes", 32, n=120, seed=1)
    index = memorisation.build_index(data, embedder, memorisation.index_key(data, "clip", 32))
    calibration = memorisation.calibrate(index)
    assert len(calibration.train.relative) == 120 and calibration.duplicate_share == 0
    assert min(calibration.train.pixel) > memorisation.DUPLICATE_PIXEL   # each image against the *others*

    copied = [index.image(i) for i in range(0, 120, 10)]
    found = memorisation.find_copies(copied, index, embedder)
    assert found["copy_rate"] == 1.0 and found["match"] == list(range(0, 120, 10))
    assert max(found["nearest_pixel"]) == 0.0 and max(found["relative"]) == 0.0

    fresh = open_dataset("shapes", 32, n=60, seed=99)
    found = memorisation.find_copies([memorisation.to_image(fresh[i]["pixel_values"]) for i in range(60)], index,
                                     embedder)
    assert found["copy_rate"] < 0.25 and found["low"] <= found["copy_rate"] <= found["high"]


def test_a_copy_through_a_lossy_decoder_still_counts_and_duplicates_do_not_set_the_bar(embedder):
    """Measured on emoji: copies come back blurred by the decoder, farther than near-variants sit from each other,
    and exact duplicates in the data gave an absolute threshold of 0. The relative rule must see through both."""
    data = open_dataset("shapes", 32, n=120, seed=1)
    doubled = torch.utils.data.ConcatDataset([data, data])
    index = memorisation.build_index(data, embedder, memorisation.index_key(data, "clip", 32))
    index = memorisation.TrainingIndex(doubled, np.concatenate([index.embeddings, index.embeddings]), index.path, 0)
    calibration = memorisation.calibrate(index)
    assert calibration.duplicate_share == 1.0 and min(calibration.train.pixel) > memorisation.DUPLICATE_PIXEL
    blurred = [index.image(i).filter(ImageFilter.GaussianBlur(0.7)) for i in range(0, 120, 10)]
    found = memorisation.find_copies(blurred, index, embedder)
    assert min(found["nearest_pixel"]) > 0.01      # no longer pixel-identical
    assert found["copy_rate"] >= 0.75 and all(m % 120 in range(0, 120, 10) for m in found["match"])


def test_seen_and_held_out_faithfulness_are_kept_apart():
    hold_out = HoldOut.parse(HOLD_OUT)
    prompts = ["a red circle", "a purple triangle", "four red circles", "four red squares", "three blue circles"]
    result = creativity.compositions(hold_out, prompts, creativity.grammar_tasks(prompts),
                                     [True, False, False, True, True])
    assert set(result) == {"single", "counting", "overall"}
    assert result["single"]["seen"]["accuracy"] == 1.0 and result["single"]["held_out"]["accuracy"] == 0.0
    assert result["counting"]["seen"]["n"] == 2 and result["counting"]["held_out"]["n"] == 1
    assert result["overall"]["seen"]["n"] == 3 and result["overall"]["held_out"]["n"] == 2

    extra, tasks = creativity.held_out_prompts([hold_out], prompts, n=3, seed=0)
    assert all(hold_out.covers(p) for p in extra) and not set(extra) & set(prompts)
    assert tasks.count("single") == 2 and tasks.count("counting") == 2     # 3 each, less those already asked


def _shapes_model(tiny_model: Path, data: Path, tmp_path: Path) -> Path:
    """The tiny model with a training.json that says it was trained on `data` holding out HOLD_OUT."""
    model = tmp_path / "held-out-model"
    shutil.copytree(tiny_model, model)
    facts = {"data": str(data), "n": 48, "data_report": {"hold_out": HoldOut.parse(HOLD_OUT).texts}}
    (model / "training.json").write_text(json.dumps(facts))
    return model


def test_eval_reports_copies_and_seen_against_held_out(tiny_model, tmp_path):
    data = tmp_path / "shapes-data"
    result = runner.invoke(app, ["data", "shapes", "--n", "48", "--out", str(data), "--hold-out", HOLD_OUT])
    assert result.exit_code == 0, result.output
    model = _shapes_model(tiny_model, data, tmp_path)
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--model", str(model), "--data", str(data), "--n", "8", "--per-prompt", "1",
                                 "--steps", "1", "--batch-sizes", "", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "copy rate" in " ".join(result.output.split())
    report = json.loads((out / "report.json").read_text())
    search = report["memorisation"]
    assert search["n_train"] == 48 and search["calibration"]["n"] == 48 and search["fresh_data"] is None
    assert not any("trained on" in w for w in report["warnings"])

    entry = report["models"][0]
    assert entry["faithfulness"] is not None                      # a shapes folder is scored like shapes
    copies = entry["creativity"]["copies"]
    assert copies["n"] == len(report["prompts"]) and 0 <= copies["copy_rate"] <= 1
    assert len(entry["creativity"]["closest_pairs"]) == min(9, copies["n"])
    held = entry["creativity"]["compositions"]
    # n=8 held-out prompts per task where the grammar has as many: single has only 3 purple triangles (no size,
    # small, large); counting has 3 counts of purple triangles and 6 colours of four circles.
    assert {task: held[task]["held_out"]["n"] for task in held} == {"single": 3, "two_objects": 8, "counting": 8,
                                                                     "position": 8, "overall": 27}
    assert report["held_out_prompts"] and all(HoldOut.parse(HOLD_OUT).covers(p) for p in report["held_out_prompts"])
    for name in ("copy_distances.png", "closest_0.png"):
        assert (out / name).stat().st_size > 0
    page = (out / "report.html").read_text()
    assert "<h2>Creativity</h2>" in page and "Seen against held-out" in page and "holding out purple triangle" in page

    # Against another data set than its own, the report says so; a second run reads the index from the cache.
    other = tmp_path / "eval-shapes"
    result = runner.invoke(app, ["eval", "--model", str(model), "--data", "shapes", "--n", "1", "--per-prompt", "1",
                                 "--steps", "1", "--batch-sizes", "", "--train-images", "40", "--relation-probe", "0",
                                 "--out", str(other)])
    assert result.exit_code == 0, result.output
    report = json.loads((other / "report.json").read_text())
    assert any(f"trained on '{data}' but is evaluated against 'shapes'" in w for w in report["warnings"])
    assert report["memorisation"]["n_train"] == 40 and report["memorisation"]["fresh_data"]["n"] == 4


def test_train_images_zero_skips_the_search_and_negative_is_an_error(tiny_model, tmp_path):
    args = ["eval", "--model", str(tiny_model), "--n", "1", "--per-prompt", "1", "--steps", "1", "--batch-sizes", "",
            "--relation-probe", "0"]
    result = runner.invoke(app, [*args, "--train-images", "0", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["memorisation"] is None and "Creativity" not in (tmp_path / "a" / "report.html").read_text()
    result = runner.invoke(app, [*args, "--train-images", "-1", "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "--train-images" in result.output and "Traceback" not in result.output
