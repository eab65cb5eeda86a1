import PIL.Image
import pytest

from brushwork.errors import BrushworkError
from brushwork.pnginfo import format_parameters, parse_parameters, read_parameters, read_parameters_text, save_png

PARAMS = dict(prompt="a red circle", negative_prompt="blurry, dark", steps=20, sampler="DPM++ 2M",
              cfg_scale=5.0, seed=7, width=64, height=48, model_hash="0123456789", model="shapes",
              version="brushwork 0.1.0")


def test_format_matches_automatic1111_layout():
    text = format_parameters(**PARAMS)
    assert text == ("a red circle\nNegative prompt: blurry, dark\n"
                    "Steps: 20, Sampler: DPM++ 2M, CFG scale: 5, Seed: 7, Size: 64x48, "
                    "Model hash: 0123456789, Model: shapes, Version: brushwork 0.1.0")
    assert "Negative prompt" not in format_parameters(**{**PARAMS, "negative_prompt": ""})
    assert "CFG scale: 7.5," in format_parameters(**{**PARAMS, "cfg_scale": 7.5})


def test_round_trip_with_awkward_values():
    params = {**PARAMS, "prompt": "line one\nline two: with, commas", "model": 'my, "odd": model',
              "clip_skip": 2}
    parsed = parse_parameters(format_parameters(**params))
    assert parsed == {**params, "clip_skip": "2"}


def test_parses_automatic1111_text():
    text = ('masterpiece, a cat\nwearing a hat\nNegative prompt: lowres, bad hands\n'
            'Steps: 28, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 123456789, '
            'Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.4, '
            'Lora hashes: "add_detail: 7c6bad76eb54, more: 0a1b2c", Version: v1.10.1')
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "masterpiece, a cat\nwearing a hat"
    assert parsed["negative_prompt"] == "lowres, bad hands"
    assert parsed["steps"] == 28 and parsed["cfg_scale"] == 7.5 and parsed["seed"] == 123456789
    assert (parsed["width"], parsed["height"]) == (512, 768)
    assert parsed["sampler"] == "Euler a" and parsed["schedule_type"] == "Karras"
    assert parsed["lora_hashes"] == "add_detail: 7c6bad76eb54, more: 0a1b2c"
    assert parsed["denoising_strength"] == "0.4" and parsed["version"] == "v1.10.1"


def test_prompt_only_text():
    assert parse_parameters("just a prompt") == {"prompt": "just a prompt", "negative_prompt": ""}


def test_bad_number_is_an_error():
    with pytest.raises(BrushworkError, match="Steps"):
        parse_parameters("p\nSteps: many, Sampler: Euler, Seed: 1")


def test_png_round_trip(tmp_path):
    image = PIL.Image.new("RGB", (8, 8), "red")
    path = save_png(image, tmp_path / "a.png", PARAMS)
    assert read_parameters(path) == PARAMS
    unicode = {**PARAMS, "prompt": "ein rotes Herz ❤ 東京"}
    save_png(image, tmp_path / "u.png", unicode)
    assert read_parameters(tmp_path / "u.png")["prompt"] == "ein rotes Herz ❤ 東京"
    assert read_parameters_text(path).startswith("a red circle\n")


def test_read_errors(tmp_path):
    with pytest.raises(BrushworkError, match="not found"):
        read_parameters(tmp_path / "missing.png")
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(BrushworkError, match="no generation parameters"):
        read_parameters(tmp_path / "plain.png")
    (tmp_path / "fake.png").write_bytes(b"not an image")
    with pytest.raises(BrushworkError, match="not a readable image"):
        read_parameters(tmp_path / "fake.png")
