"""The user's data: folder layouts, tar shards, bad files skipped and reported, modes, EXIF, transforms."""

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from brushwork.data.folder import FolderDataset, detect_layout
from brushwork.data.transforms import ImageTransform, to_rgb, to_tensor
from brushwork.errors import BrushworkError


def noise_image(seed: int, size=(16, 16), mode="RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny valid-looking PNG whose header claims a huge size (a decompression bomb by its header)."""
    data = bytearray(png_bytes(noise_image(0)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def exif_rotated_jpeg(path) -> None:
    """A 20x10 JPEG whose EXIF says 'rotate 90 degrees clockwise to display' (orientation 6)."""
    image = Image.new("RGB", (20, 10), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, "JPEG", exif=exif)


def make_folder(root, n: int = 100, layout: str = "captions") -> dict[str, str]:
    """n image files in `root`, 5 of them broken in different ways; returns {broken name: reason kind}."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"img{i:03d}.png"
        (root / name).write_bytes(png_bytes(noise_image(i)))
        rows.append({"file_name": name, "text": f"noise picture number {i}"})
    broken = {"img003.png": "not an image", "img017.png": "truncated", "img042.png": "too small",
              "img066.png": "too large", "img088.png": "empty caption"}
    (root / "img003.png").write_bytes(b"this is not an image at all" * 10)
    (root / "img017.png").write_bytes(png_bytes(noise_image(17, (64, 64)))[:900])
    noise_image(42, (4, 4)).save(root / "img042.png")
    (root / "img066.png").write_bytes(bomb_png())
    rows[88]["text"] = "   \n "
    if layout == "captions":
        for row in rows:
            (root / row["file_name"]).with_suffix(".txt").write_text(row["text"])
    else:
        (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return broken


@pytest.mark.parametrize("layout", ["captions", "metadata"])
def test_hundred_images_five_broken_load_95_and_report_5(tmp_path, layout):
    broken = make_folder(tmp_path / "data", 100, layout)
    dataset = FolderDataset(tmp_path / "data")
    assert dataset.layout == layout
    assert len(dataset) == 95 and dataset.report.loaded == 95
    assert dataset.report.summary().startswith("95 loaded, 5 skipped (")
    reported = dict(dataset.report.skipped)
    assert set(reported) == set(broken)
    for name, kind in broken.items():
        assert reported[name].startswith(kind), (name, reported[name])
    item = dataset[0]
    assert item["image"].mode == "RGB" and item["text"] == "noise picture number 0"
    assert all(dataset[i]["name"] not in broken for i in range(len(dataset)))


def test_missing_caption_and_bad_metadata_rows_are_reported(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        noise_image(i).save(root / f"{i}.png")
    lines = [json.dumps({"file_name": "0.png", "text": "zero"}), "{not json", json.dumps({"text": "no file"}),
             json.dumps({"file_name": "1.png", "caption": "one, via the caption field"}),
             json.dumps({"file_name": "gone.png", "text": "missing file"})]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    dataset = FolderDataset(root)
    assert dataset.captions() == ["zero", "one, via the caption field"]
    reported = dict(dataset.report.skipped)
    assert reported["2.png"].startswith("no caption")
    assert reported["gone.png"].startswith("missing file")
    assert reported["metadata.jsonl:2"].startswith("bad metadata")
    assert reported["metadata.jsonl:3"].startswith("bad metadata")


def test_txt_layout_reports_image_without_caption(tmp_path):
    noise_image(0).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a caption\nover two lines ")
    noise_image(1).save(tmp_path / "b.jpg")
    dataset = FolderDataset(tmp_path)
    assert dataset.captions() == ["a caption over two lines"]
    assert dataset.report.skipped == [("b.jpg", "no caption: b.txt not found")]


def test_modes_exif_and_large_images_load_as_upright_rgb(tmp_path):
    rgba = Image.new("RGBA", (12, 12), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    Image.new("L", (12, 12), 100).save(tmp_path / "gray.png")
    Image.fromarray(np.full((12, 12), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    noise_image(3, (12, 12)).convert("P").save(tmp_path / "palette.png")
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    exif_rotated_jpeg(tmp_path / "rotated.jpg")
    noise_image(5, (1600, 1200)).save(tmp_path / "large.jpg", quality=70)
    for path in tmp_path.iterdir():
        path.with_suffix(".txt").write_text(f"a {path.stem} image")
    dataset = FolderDataset(tmp_path, draft_side=64)
    assert dataset.report.skipped == [] and len(dataset) == 7
    items = {item["name"]: item["image"] for item in (dataset[i] for i in range(len(dataset)))}
    assert all(image.mode == "RGB" for image in items.values())
    assert items["rgba.png"].getpixel((5, 5)) == (255, 255, 255)      # transparent -> white
    assert items["rgba.png"].getpixel((0, 0)) == (0, 0, 255)
    assert items["deep.png"].getpixel((0, 0)) == (255, 255, 255)      # 16-bit full scale -> 255
    assert items["gray.png"].getpixel((0, 0)) == (100, 100, 100)
    red, green, blue = items["cmyk.jpg"].getpixel((6, 6))
    assert red > 200 and green < 60 and blue < 60
    assert items["rotated.jpg"].size == (10, 20)                      # EXIF orientation applied
    assert 64 <= min(items["large.jpg"].size) < 1200                  # JPEG decoded at reduced scale
    tensor = ImageTransform(32)(items["large.jpg"])
    assert tensor.shape == (3, 32, 32)


def test_truncated_jpeg_is_found_when_indexing_so_counts_match_inspect(tmp_path):
    for i in range(4):
        noise_image(i, (64, 64)).save(tmp_path / f"{i}.jpg", quality=90)
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    data = (tmp_path / "1.jpg").read_bytes()
    (tmp_path / "1.jpg").write_bytes(data[: len(data) // 2])   # header intact: verify() alone passes it
    dataset = FolderDataset(tmp_path, draft_side=32)
    assert len(dataset) == 3 and dataset.report.loaded == 3
    assert dataset.report.skipped[0][0] == "1.jpg" and dataset.report.skipped[0][1].startswith("truncated")


def test_an_image_broken_after_indexing_falls_back_deterministically(tmp_path):
    for i in range(4):
        noise_image(i, (64, 64)).save(tmp_path / f"{i}.jpg", quality=90)
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    dataset = FolderDataset(tmp_path)
    assert len(dataset) == 4
    data = (tmp_path / "1.jpg").read_bytes()
    (tmp_path / "1.jpg").write_bytes(data[: len(data) // 2])
    item = dataset[1]
    assert item["text"] == "caption 2"
    assert dataset[1]["text"] == "caption 2"
    assert dataset.report.skipped == [("1.jpg", dataset.report.skipped[0][1])]
    assert dataset.report.skipped[0][1].startswith("truncated") and dataset.report.loaded == 3


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_read_in_place(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "part-000.tar", "w") as tar:
        add_member(tar, "a.png", png_bytes(noise_image(1)))
        add_member(tar, "a.txt", b"first caption")
        add_member(tar, "sub/b.jpg", png_bytes(noise_image(2)))   # content sniffed, not trusted by extension
        add_member(tar, "sub/b.json", json.dumps({"caption": "second caption"}).encode())
        add_member(tar, "c.png", png_bytes(noise_image(3)))
        add_member(tar, "d.webp", b"garbage")
        add_member(tar, "d.txt", b"bad image")
    with tarfile.open(shards / "part-001.tar", "w") as tar:
        add_member(tar, "e.png", png_bytes(noise_image(4)))
        add_member(tar, "e.json", json.dumps({"text": "third caption"}).encode())
    (shards / "part-002.tar").write_bytes(b"not a tar file" * 100)
    assert detect_layout(shards) == "shards"
    dataset = FolderDataset(shards)
    assert dataset.captions() == ["first caption", "second caption", "third caption"]
    assert np.array_equal(np.asarray(dataset[2]["image"]), np.asarray(noise_image(4)))
    reported = dict(dataset.report.skipped)
    assert reported["part-000.tar:c"].startswith("no caption")
    assert reported["part-000.tar:d"].startswith("not an image")
    assert reported["part-002.tar"].startswith("unreadable shard")
    single = FolderDataset(shards / "part-001.tar")
    assert single.captions() == ["third caption"] and single[0]["name"] == "part-001.tar:e"


def test_empty_or_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(BrushworkError, match="not found"):
        FolderDataset(tmp_path / "nothing")
    with pytest.raises(BrushworkError, match="no images"):
        FolderDataset(tmp_path)
    noise_image(0).save(tmp_path / "a.png")
    with pytest.raises(BrushworkError, match="no usable image-caption pairs.*a.png: no caption"):
        FolderDataset(tmp_path)


def test_to_rgb_palette_transparency_and_float():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] * 256)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("LA", (4, 4), (0, 255))).getpixel((1, 1)) == (0, 0, 0)
    assert to_rgb(Image.new("F", (4, 4), 0.5)).getpixel((0, 0)) == (0, 0, 0)  # flat image stretches to 0


def test_transform_resize_centre_crop_random_crop_and_flip():
    stripes = np.zeros((20, 60, 3), dtype=np.uint8)
    stripes[:, :20] = (255, 0, 0)
    stripes[:, 20:40] = (0, 255, 0)
    stripes[:, 40:] = (0, 0, 255)
    image = Image.fromarray(stripes)
    centre = ImageTransform(10)(image)
    assert centre.shape == (3, 10, 10) and centre.min() >= -1 and centre.max() <= 1
    assert torch.allclose(centre[:, 5, 5], torch.tensor([-1.0, 1.0, -1.0]))   # the middle (green) third
    crops = {tuple(ImageTransform(10, center_crop=False)(image, torch.Generator().manual_seed(s))[:, 5, 0].tolist())
             for s in range(20)}
    assert len(crops) > 1                                                    # random crops move
    generator = torch.Generator().manual_seed(0)
    first = ImageTransform(10, center_crop=False)(image, generator)
    assert torch.equal(first, ImageTransform(10, center_crop=False)(image, torch.Generator().manual_seed(0)))
    ramp = Image.fromarray(np.tile(np.arange(0, 240, 15, dtype=np.uint8)[None, :, None], (16, 1, 3)))
    unflipped = [ImageTransform(16)(ramp, torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(torch.equal(t, to_tensor(ramp)) for t in unflipped)           # no flip unless asked
    flips = [ImageTransform(16, random_flip=True)(ramp, torch.Generator().manual_seed(s)) for s in range(16)]
    assert any(torch.equal(t, to_tensor(ramp).flip(-1)) for t in flips)
    assert any(torch.equal(t, to_tensor(ramp)) for t in flips)
