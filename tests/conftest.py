
import json

import pytest
import torch
from PIL import Image

# Tiny test models gain nothing from a second thread; one keeps runs steady when the cores are shared.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Nothing in the tests may reach a hub: the machine has no network beyond package registries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture()
def photo_folder(tmp_path):
    """An image folder whose captions are outside the shapes grammar: two plain walls."""
    folder = tmp_path / "photos"
    folder.mkdir()
    lines = []
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (32, 32), color).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of a {color} wall"}) + "\n")
    (folder / "metadata.jsonl").write_text("".join(lines))
    return folder
