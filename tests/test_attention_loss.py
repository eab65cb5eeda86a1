import json

import pytest
import torch
from PIL import Image

from brushwork.data.captions import all_captions
from brushwork.data.dataset import open_dataset
from brushwork.data.io import write_shapes
from brushwork.models.sizes import build_clip, build_unet, build_vae, get_size
from brushwork.tokenizer import train_tokenizer
from brushwork.train.attention_loss import RegionTargets, box_mask, install_recorder, phrase_positions
from brushwork.train.loop import TrainConfig, run
from brushwork.train.stages import UnetStage, text_encoder_from_clip

SIZE = get_size("tiny")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(all_captions(), tmp_path_factory.mktemp("tokenizer"))


def test_phrase_tokens_and_box_masks(tokenizer):
    texts = ["a red circle left of a blue square", "three green triangles", ""]
    regions = [[{"phrase": "red circle", "box": [0.0, 0.3, 0.3, 0.6]}, {"phrase": "blue square", "box": [0.6, 0.3, 0.9, 0.6]}],
               [{"phrase": "green triangle", "box": [0.0, 0.0, 0.2, 0.2]},
                {"phrase": "green triangle", "box": [0.5, 0.5, 0.7, 0.7]}],
               [{"phrase": "red circle", "box": [0.0, 0.0, 1.0, 1.0]}]]   # a dropped caption: no target
    targets = RegionTargets(tokenizer, texts, regions, max_tokens=77)
    ids = tokenizer(texts[0]).input_ids
    red, circle = tokenizer.convert_tokens_to_ids(["red</w>", "circle</w>"])
    assert [ids[i] for i in targets.tokens[0, 0].nonzero().flatten().tolist()] == [red, circle]
    assert targets.valid.tolist() == [[1, 1], [1, 0], [0, 0]]   # the three triangles share one token set
    masks = targets.masks(4)
    assert masks[0, 0].view(4, 4)[:, 0].tolist() == [0, 1, 0, 0]   # column 0, row 1 (centre y 0.375)
    assert masks[1, 0].view(4, 4).nonzero().tolist() == [[0, 0], [2, 2]]   # the two boxes joined
    assert box_mask([0.5, 0.5, 0.52, 0.52], 4).sum() == 1   # smaller than a cell: the cell under its centre
    assert phrase_positions("three green triangles".split(), "green triangle") == [1, 2]
    assert phrase_positions("a red circle".split(), "blue circle") == []


def test_recorder_keeps_the_unet_output_and_the_loss_pulls_attention_into_the_box(tokenizer):
    torch.manual_seed(0)
    unet, reference = build_unet(SIZE), build_unet(SIZE)
    recorder = install_recorder(unet)
    latents, text = torch.randn(2, 4, 16, 16), torch.randn(2, 77, SIZE.clip_text["hidden_size"])
    timesteps = torch.tensor([100, 900])
    with torch.no_grad():
        assert torch.allclose(unet(latents, timesteps, text).sample, reference(latents, timesteps, text).sample, atol=1e-5)
    assert recorder.maps == []   # nothing kept unless recording

    texts = ["a red circle", "a blue square"]
    regions = [[{"phrase": "red circle", "box": [0.0, 0.0, 0.5, 0.5]}], [{"phrase": "blue square", "box": [0.5, 0.5, 1, 1]}]]
    targets = RegionTargets(tokenizer, texts, regions, max_tokens=77)
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        recorder.maps.clear()
        recorder.recording = True
        unet(latents, timesteps, text)
        recorder.recording = False
        loss = targets.loss(recorder.maps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_shapes_items_and_written_folders_carry_object_regions(tmp_path):
    item = open_dataset("shapes", n=4)[1]
    assert item["regions"] and all(len(r["box"]) == 4 and 0 <= min(r["box"]) for r in item["regions"])
    write_shapes(tmp_path / "d", n=3)
    rows = [json.loads(line) for line in (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()]
    data = open_dataset(str(tmp_path / "d"))
    assert data[0]["regions"] == rows[0]["regions"]
    # A non-square image is cropped: its boxes would no longer fit, so they are dropped.
    Image.new("RGB", (96, 64), "white").save(tmp_path / "d" / rows[0]["file_name"])
    assert "regions" not in open_dataset(str(tmp_path / "d"))[0]


def test_unet_stage_trains_with_the_attention_loss(tokenizer, tmp_path):
    data = open_dataset("shapes", n=16)
    clip = build_clip(SIZE, len(tokenizer))
    stage = UnetStage(data, build_unet(SIZE), text_encoder_from_clip(clip), tokenizer, build_vae(SIZE),
                      attention_loss=0.5, caption_dropout=0.0)
    result = run(stage, TrainConfig(tmp_path, max_steps=2, batch_size=8, log_every=1, mixed_precision="no"))
    records = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert all(0 < record["attention"] <= 1 for record in records)
    assert stage.fingerprint()["attention_loss"] == 0.5
