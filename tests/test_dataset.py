"""open_dataset: names and paths to tensors, the emoji cache, limits and errors; io writing and inspecting."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from brushwork.data.dataset import cache_root, open_dataset
from brushwork.data.io import inspect_dataset, write_dataset, write_emoji, write_shapes
from brushwork.data.shapes import TRAIN_TASK_WEIGHTS, ShapesDataset
from brushwork.errors import BrushworkError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRUSHWORK_CACHE", str(tmp_path / "cache"))


def test_shapes_items_are_tensors_in_range_matching_the_source():
    dataset = open_dataset("shapes", n=6, seed=3)
    assert len(dataset) == 6 and dataset.report.loaded == 6
    item = dataset[2]
    assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    source = ShapesDataset(6, 3, TRAIN_TASK_WEIGHTS)[2]
    assert item["text"] == source["text"]
    expected = torch.from_numpy(np.array(source["image"])).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(item["pixel_values"], expected)                     # 64 px: no resampling at all
    assert list(dataset.captions()) == [ShapesDataset(6, 3, TRAIN_TASK_WEIGHTS)[i]["text"] for i in range(6)]
    assert open_dataset("shapes", resolution=32, n=2)[0]["pixel_values"].shape == (3, 32, 32)
    assert len(open_dataset("shapes")) == 20_000


def test_training_draws_position_twice_as_often_and_evaluation_draws_tasks_equally():
    def shares(dataset):
        tasks = Counter(dataset.source[i]["scene"].task for i in range(len(dataset)))
        return {task: count / len(dataset) for task, count in tasks.items()}

    training = shares(open_dataset("shapes", n=2000, seed=4))
    assert training["position"] == pytest.approx(0.4, abs=0.04)
    assert all(training[task] == pytest.approx(0.2, abs=0.03) for task in ("single", "two_objects", "counting"))
    equal = shares(open_dataset("shapes", n=2000, seed=4, shapes_tasks=None))
    assert all(share == pytest.approx(0.25, abs=0.03) for share in equal.values())


def test_training_json_records_the_shapes_mix_and_creativity_draws_the_same_scenes():
    from brushwork.data.dataset import data_facts
    from brushwork.eval.creativity import training_data
    from brushwork.train.recipe import data_line

    trained = open_dataset("shapes", n=8, seed=5)
    facts = {"data": "shapes", "n": 8, "seed": 5, "resolution": 64, "data_report": data_facts(trained)}
    assert facts["data_report"]["shapes_tasks"] == TRAIN_TASK_WEIGHTS
    assert "tasks single 1 : two_objects 1 : counting 1 : position 2" in data_line(facts)
    assert list(training_data("shapes", facts, 64, None).captions()) == list(trained.captions())
    equal = list(open_dataset("shapes", n=8, seed=5, shapes_tasks=None).captions())
    assert equal != list(trained.captions())
    del facts["data_report"]["shapes_tasks"]      # a model from before the mix was recorded drew the tasks equally
    assert list(training_data("shapes", facts, 64, None).captions()) == equal


def test_folder_and_limit(tmp_path):
    write_shapes(tmp_path / "folder", n=5, seed=1)
    dataset = open_dataset(str(tmp_path / "folder"), resolution=48)
    assert len(dataset) == 5 and dataset[4]["pixel_values"].shape == (3, 48, 48)
    assert dataset.captions() == [ShapesDataset(5, 1)[i]["text"] for i in range(5)]
    assert len(open_dataset(str(tmp_path / "folder"), n=3)) == 3
    with pytest.raises(IndexError):
        open_dataset(str(tmp_path / "folder"), n=3)[3]


def test_emoji_uses_the_cache_folder(tmp_path):
    write_emoji(cache_root() / "emoji-32", size=32, limit=12)   # a small stand-in for the full build
    dataset = open_dataset("emoji", resolution=32)
    assert len(dataset) == 12 and dataset[0]["pixel_values"].shape == (3, 32, 32)
    assert dataset.captions()[0] == "keycap #"                          # OpenMoji's first file, 0023-FE0F-20E3


def test_unknown_name_or_missing_path_lists_what_is_accepted(tmp_path):
    for spec in ["shape", str(tmp_path / "missing")]:
        with pytest.raises(BrushworkError, match="'shapes', 'emoji', or a path.*metadata.jsonl.*tar"):
            open_dataset(spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BrushworkError, match="no images"):
        open_dataset(str(tmp_path / "empty"))


def test_write_dataset_is_safe_and_atomic(tmp_path):
    out = tmp_path / "written" / "out"
    items = [{"image": Image.new("RGB", (8, 8), "red"), "text": "red", "extra": {"k": 1}}]
    assert write_dataset(items, out) == 1
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert rows == [{"file_name": "images/000000.png", "text": "red", "extra": {"k": 1}}]
    with pytest.raises(BrushworkError, match="not empty.*--overwrite"):
        write_dataset(items, out)

    def failing():
        yield items[0]
        raise BrushworkError("boom")

    with pytest.raises(BrushworkError, match="boom"):
        write_dataset(failing(), out, overwrite=True)
    assert (out / "metadata.jsonl").read_text().count("\n") == 1          # old data intact after a failure
    assert [p.name for p in out.parent.iterdir()] == ["out"]              # no staging folder left behind
    write_dataset(items * 3, out, overwrite=True)
    assert len(list((out / "images").iterdir())) == 3
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "precious.txt").write_text("keep me")
    with pytest.raises(BrushworkError, match="not a data set folder"):
        write_dataset(items, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "precious.txt").read_text() == "keep me"


def test_inspect_counts_captions_sizes_and_problems(tmp_path):
    write_shapes(tmp_path / "d", n=4, seed=0)
    (tmp_path / "d" / "images" / "000001.png").write_bytes(b"broken")
    found = inspect_dataset(tmp_path / "d")
    assert found.report.loaded == 3
    assert found.report.skipped == [("images/000001.png", "not an image: unrecognised or corrupt header")]
    assert found.widths.min == found.widths.max == 64
    assert 3 <= found.words.min <= found.words.mean <= found.words.max <= 8
    assert found.modes == {"RGB": 3}


@pytest.mark.slow
def test_full_emoji_build_into_cache():
    dataset = open_dataset("emoji")
    assert len(dataset) >= 3500
    assert (cache_root() / "emoji-64" / "ATTRIBUTION").is_file()
    assert "red apple" in dataset.captions()
