"""Data people already have: `datasets` save_to_disk folders, parquet, Hub split folders, WebDataset .tar.gz and
brace lists, and shards written by `brushwork data --format webdataset`. Every data set is built here."""

import io
import json
import tarfile

import datasets
import numpy as np
import pytest
import webdataset
from PIL import Image
from typer.testing import CliRunner

from brushwork.cli import app
from brushwork.data.dataset import open_dataset
from brushwork.data.folder import DataOptions, FolderDataset, detect_layout
from brushwork.errors import BrushworkError

runner = CliRunner()
COLORS = ("red", "blue", "green", "yellow")


def png(color: str, side: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buffer, "PNG")
    return buffer.getvalue()


def table(captions=None, image="image", text="text") -> datasets.Dataset:
    captions = captions or [f"a {color} square" for color in COLORS]
    images = [Image.new("RGB", (16, 16), color) for color in COLORS[:len(captions)]]
    return datasets.Dataset.from_dict({image: images, text: captions}).cast_column(image, datasets.Image())


def test_save_to_disk_dataset_and_datasetdict(tmp_path):
    table().save_to_disk(tmp_path / "one")
    data = FolderDataset(tmp_path / "one")
    assert data.layout == "arrow" and data.captions() == [f"a {color} square" for color in COLORS]
    assert data[1]["image"].getpixel((0, 0)) == (0, 0, 255)
    datasets.DatasetDict(train=table(), test=table(["only one"])).save_to_disk(tmp_path / "dict")
    assert len(FolderDataset(tmp_path / "dict")) == 4   # train by default
    test = FolderDataset(tmp_path / "dict", options=DataOptions(split="test"))
    assert test.captions() == ["only one"] and test.source.describe() == "arrow layout, split 'test' of train, test"
    with pytest.raises(BrushworkError, match="no split 'valid'.*train, test"):
        FolderDataset(tmp_path / "dict", options=DataOptions(split="valid"))
    with pytest.raises(BrushworkError, match="has no splits \\(arrow layout\\): leave out --split"):
        FolderDataset(tmp_path / "one", options=DataOptions(split="test"))


def test_parquet_with_other_column_names_numbers_and_bad_rows(tmp_path):
    rows = table(["1984", None, "  a green\nsquare ", " "], image="jpg", text="prompt")
    rows.to_parquet(str(tmp_path / "pairs.parquet"))
    data = FolderDataset(tmp_path / "pairs.parquet")
    assert data.layout == "parquet" and data.captions() == ["1984", "a green square"]
    assert data.report.skipped == [("pairs[1]", "no caption: the caption is null"), ("pairs[3]", "empty caption")]
    with pytest.raises(BrushworkError, match="no column 'words'; its columns are jpg, prompt"):
        FolderDataset(tmp_path / "pairs.parquet", options=DataOptions(caption_column="words"))
    datasets.Dataset.from_dict({"picture": [png("red")], "words": ["a red square"]}).to_parquet(
        str(tmp_path / "odd.parquet"))
    with pytest.raises(BrushworkError, match="no image column .*--image-column"):
        FolderDataset(tmp_path / "odd.parquet")
    odd = FolderDataset(tmp_path / "odd.parquet", options=DataOptions(image_column="picture", caption_column="words"))
    assert odd.captions() == ["a red square"] and odd[0]["image"].size == (16, 16)   # a plain bytes column


def test_a_number_is_a_caption_and_a_list_is_not(tmp_path):
    rows = []
    for i, caption in enumerate((1984, 2.5, ["a", "list"], True)):
        (tmp_path / f"{i}.png").write_bytes(png(COLORS[i]))
        rows.append(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    (tmp_path / "metadata.jsonl").write_text("".join(rows))
    data = FolderDataset(tmp_path)
    assert data.captions() == ["1984", "2.5"]
    assert data.report.skipped == [("2.png", "bad caption: a list, not text"),
                                   ("3.png", "bad caption: a bool, not text")]


def test_hub_parquet_folder_splits(tmp_path):
    (tmp_path / "hub" / "data").mkdir(parents=True)
    table().to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    table(["one test caption"]).to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    assert len(FolderDataset(tmp_path / "hub")) == 4
    assert FolderDataset(tmp_path / "hub", options=DataOptions(split="test")).captions() == ["one test caption"]


def split_folder(root, split: str, n: int) -> None:
    (root / split).mkdir(parents=True)
    rows = []
    for i in range(n):
        (root / split / f"{i}.png").write_bytes(png(COLORS[i]))
        rows.append(json.dumps({"file_name": f"{i}.png", "caption": f"{split} picture {i}"}) + "\n")
    (root / split / "metadata.jsonl").write_text("".join(rows))


def test_hub_split_folder_is_detected_and_named(tmp_path):
    split_folder(tmp_path, "train", 3)
    split_folder(tmp_path, "test", 2)
    data = FolderDataset(tmp_path)
    assert len(data) == 3 and data.report.skipped == []
    assert data.source.describe() == "metadata layout, split 'train' of test, train"
    assert FolderDataset(tmp_path, options=DataOptions(split="test")).captions() == ["test picture 0",
                                                                                       "test picture 1"]
    result = runner.invoke(app, ["data", "inspect", str(tmp_path), "--split", "test"])
    assert result.exit_code == 0 and "split 'test' of test, train" in result.output
    assert "usable image-caption pairs: 2" in result.output
    result = runner.invoke(app, ["data", "inspect", str(tmp_path), "--split", "nope"])
    assert result.exit_code == 1 and "no split 'nope'" in result.output and "Traceback" not in result.output


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_gzipped_shards_and_brace_lists(tmp_path):
    for index in range(3):
        with tarfile.open(tmp_path / f"shard-{index:05d}.tar.gz", "w:gz") as tar:
            add_member(tar, f"{index}.png", png(COLORS[index]))
            add_member(tar, f"{index}.txt", f"caption {index}".encode())
    (tmp_path / "broken.tar.gz").write_bytes(b"not gzip" * 10)
    assert detect_layout(tmp_path / "shard-00000.tar.gz") == "shards"
    data = FolderDataset(str(tmp_path / "shard-{00000..00002}.tar.gz"))
    assert data.captions() == ["caption 0", "caption 1", "caption 2"]
    assert data[2]["image"].getpixel((0, 0)) == (0, 128, 0)
    folder = FolderDataset(tmp_path)
    assert len(folder) == 3 and dict(folder.report.skipped)["broken.tar.gz"].startswith("unreadable shard")
    with pytest.raises(BrushworkError, match="1 of the 4 shards .* not found"):
        open_dataset(str(tmp_path / "shard-{00000..00003}.tar.gz"))
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "shard-{00000..00009}.tar.gz")])
    assert result.exit_code == 1 and result.output.startswith("Error:") and "Traceback" not in result.output


def test_data_writes_webdataset_shards_that_webdataset_reads(tmp_path):
    out = tmp_path / "shards"
    result = runner.invoke(app, ["data", "shapes", "--n", "5", "--out", str(out), "--format", "webdataset"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.tar"]
    samples = list(webdataset.WebDataset(str(out / "shard-00000.tar"), shardshuffle=False).decode("pil"))
    assert len(samples) == 5 and samples[0]["txt"] == samples[0]["json"]["text"]
    assert "scene" in samples[0]["json"] and samples[0]["png"].size == (64, 64)
    ours = FolderDataset(out)
    assert ours.captions() == [sample["txt"] for sample in samples]
    assert np.array_equal(np.asarray(ours[0]["image"]), np.asarray(samples[0]["png"].convert("RGB")))
    again = runner.invoke(app, ["data", "shapes", "--n", "2", "--out", str(out), "--format", "webdataset",
                                "--overwrite"])
    assert again.exit_code == 0 and len(FolderDataset(out)) == 2
    bad = runner.invoke(app, ["data", "shapes", "--n", "2", "--out", str(tmp_path / "x"), "--format", "zip"])
    assert bad.exit_code == 1 and "unknown data set format 'zip'" in bad.output
