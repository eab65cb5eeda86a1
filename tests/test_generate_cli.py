import numpy as np
import PIL.Image
import pytest
from sd_tiny import build_tiny_sd
from typer.testing import CliRunner

from brushwork.cli import app
from brushwork.pnginfo import read_parameters, read_parameters_text, save_png

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "shapes-tiny", "v1", seed=1)


def run(*args: str, model=None):
    extra = ["--model", str(model), "--steps", "3", "--height", "32", "--width", "32"] if model else []
    return runner.invoke(app, [*args, *extra])


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path), dtype=np.int16)


def test_generate_numbered_files_and_info(model_dir, tmp_path):
    out = tmp_path / "out.png"
    result = run("generate", "a red circle", "-n", "2", "--seed", "7", "--negative", "blue",
                 "--sampler", "euler", "-o", str(out), model=model_dir)
    assert result.exit_code == 0, result.output
    first, second = tmp_path / "out-0.png", tmp_path / "out-1.png"
    assert result.stdout.split() == [str(first), str(second)]
    params = read_parameters(second)
    assert params["prompt"] == "a red circle" and params["negative_prompt"] == "blue"
    assert params["seed"] == 8 and params["steps"] == 3 and params["sampler"] == "Euler"
    assert (params["width"], params["height"]) == (32, 32) and params["model"] == "shapes-tiny"

    info = run("info", str(second))
    assert info.exit_code == 0
    assert info.stdout.startswith("a red circle\nNegative prompt: blue\nSteps: 3, Sampler: Euler, CFG scale: 5, Seed: 8")
    as_json = run("info", str(second), "--json")
    assert '"seed": 8' in as_json.stdout

    # --from regenerates the same image; existing names are never overwritten
    again = run("generate", "--from", str(second), "--model", str(model_dir), "-o", str(first))
    assert again.exit_code == 0, again.output
    assert again.stdout.split() == [str(tmp_path / "out-0-1.png")]
    assert np.abs(pixels(second) - pixels(tmp_path / "out-0-1.png")).max() <= 2


def test_compiled_generation_pads_a_short_last_batch_to_the_compiled_size(model_dir, tmp_path, monkeypatch):
    from brushwork.generation import diffusion_model
    from brushwork.generation.pipeline import LatentDiffusionPipeline

    monkeypatch.setattr(diffusion_model, "CompiledModule", lambda module, name: module)  # compiling: slow tests
    sizes = []
    original = LatentDiffusionPipeline.__call__

    def recording_call(self, prompt, **kwargs):
        sizes.append(len(prompt))
        return original(self, prompt, **kwargs)

    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", recording_call)
    result = run("generate", "a red circle", "-n", "5", "--batch-size", "2", "--compile", "--seed", "3",
                 "-o", f"{tmp_path}/", model=model_dir)
    assert result.exit_code == 0, result.output
    assert sizes == [2, 2, 2] and len(result.stdout.split()) == 5
    assert read_parameters(tmp_path / "00004.png")["seed"] == 7


def test_images_carry_the_watermark_unless_turned_off(model_dir, tmp_path):
    from brushwork.watermark import detect

    marked, plain = tmp_path / "marked.png", tmp_path / "plain.png"
    assert run("generate", "a red circle", "--seed", "3", "-o", str(marked), model=model_dir).exit_code == 0
    assert run("generate", "a red circle", "--seed", "3", "--no-watermark", "-o", str(plain),
               model=model_dir).exit_code == 0
    assert detect(PIL.Image.open(marked)).found
    assert not detect(PIL.Image.open(plain)).found
    assert 0 < np.abs(pixels(marked) - pixels(plain)).max() <= 6


def test_folder_output_prompts_file_and_random_seed(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\na green triangle\n")
    folder = tmp_path / "images"
    result = run("generate", "--prompts", str(prompts), "--batch-size", "2", "-o", f"{folder}/", model=model_dir)
    assert result.exit_code == 0, result.output
    paths = [folder / f"{i:05d}.png" for i in range(3)]
    assert result.stdout.split() == [str(p) for p in paths]
    seeds = [read_parameters(p)["seed"] for p in paths]
    assert seeds[1] == seeds[0] + 1 and seeds[2] == seeds[0] + 2
    assert read_parameters(paths[2])["prompt"] == "a green triangle"
    more = run("generate", "one more", "-o", str(folder), model=model_dir)
    assert more.stdout.split() == [str(folder / "00003.png")]


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--steps", "0"], "steps must be"),
    (["generate", "x", "--guidance", "nan"], "guidance"),
    (["generate", "x", "-n", "0"], "-n must be"),
    (["generate", "x", "--height", "30"], "multiple of 4"),
    (["generate", "x", "--sampler", "plms"], "unknown sampler"),
    (["generate", "x", "--seed", "-2"], "--seed must be -1 (random) or at least 0"),
    (["generate", "x", "--precision", "fp8"], "unknown precision"),
    (["generate", "x", "-o", "out.jpg"], "PNG"),
    (["generate"], "give a prompt"),
    (["generate", "x", "--prompts", "missing.txt"], "both"),
    (["generate", "--prompts", "missing.txt"], "prompts file not found"),
    (["generate", "--from", "missing.png"], "image not found"),
    (["info", "missing.png"], "image not found"),
])
def test_bad_input_is_a_clean_error(model_dir, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    extra = ["--model", str(model_dir)] if args[0] == "generate" else []
    result = runner.invoke(app, args + extra)
    assert result.exit_code == 1
    assert "Error" in result.output and message in result.output
    assert "Traceback" not in result.output


def test_missing_model_is_a_clean_error(tmp_path):
    result = runner.invoke(app, ["generate", "x", "--model", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "model not found" in result.output


def test_a_gan_image_records_one_step_and_regenerates_without_warnings(tmp_path):
    # The shipped GAN: Steps 1 in the PNG, Sampler GAN (parsers of A1111's text skip a PNG without a sampler), no
    # CFG scale it did not use, and no warning about steps unless --steps is given.
    out = tmp_path / "gan.png"
    result = CliRunner().invoke(app, ["generate", "a blue square", "--model", "shapes-gan", "--seed", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "no effect" not in result.output
    params = read_parameters(out)
    assert params["steps"] == 1 and params["sampler"] == "GAN" and "cfg_scale" not in params and params["seed"] == 3
    again = tmp_path / "again.png"
    result = CliRunner().invoke(app, ["generate", "--from", str(out), "-o", str(again)])
    assert result.exit_code == 0 and "no effect" not in result.output, result.output
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(PIL.Image.open(again)))
    result = CliRunner().invoke(app, ["generate", "a blue square", "--model", "shapes-gan", "--steps", "30",
                                      "-o", str(tmp_path / "third.png")])
    assert result.exit_code == 0 and "num_inference_steps has no effect" in result.output, result.output


def test_layout_is_stored_and_regenerated(model_dir, tmp_path):
    out, plain, again = tmp_path / "layout.png", tmp_path / "plain.png", tmp_path / "again.png"
    prompt = "a red circle above a blue square"
    assert run("generate", prompt, "--seed", "4", "--layout", "-o", str(out), model=model_dir).exit_code == 0
    assert run("generate", prompt, "--seed", "4", "-o", str(plain), model=model_dir).exit_code == 0
    assert read_parameters(out)["layout"] == "on" and "layout" not in read_parameters(plain)
    assert np.abs(pixels(out) - pixels(plain)).max() > 10
    result = runner.invoke(app, ["generate", "--from", str(out), "--model", str(model_dir), "-o", str(again)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(out), pixels(again))


def test_layout_with_a_gan_is_a_clean_error(tmp_path):
    result = runner.invoke(app, ["generate", "a red circle above a blue square", "--model", "shapes-gan", "--layout",
                                 "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "layout guidance needs a diffusion model" in result.output
    assert "Traceback" not in result.output


def test_seed_minus_one_is_random_and_the_png_records_the_seed_used(model_dir, tmp_path):
    first, second, again = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "again.png"
    for out in (first, second):
        assert run("generate", "a red circle", "--seed", "-1", "-o", str(out), model=model_dir).exit_code == 0
    seeds = [read_parameters(out)["seed"] for out in (first, second)]
    assert all(0 <= seed < 2**32 for seed in seeds) and seeds[0] != seeds[1]
    result = runner.invoke(app, ["generate", "--from", str(first), "--model", str(model_dir), "-o", str(again)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(first), pixels(again))


def test_from_says_that_a_schedule_type_is_ignored(model_dir, tmp_path):
    made, karras, again = tmp_path / "made.png", tmp_path / "karras.png", tmp_path / "again.png"
    assert run("generate", "a red circle", "--seed", "2", "-o", str(made), model=model_dir).exit_code == 0
    save_png(PIL.Image.open(made), karras, read_parameters_text(made) + ", Schedule type: Karras")
    result = runner.invoke(app, ["generate", "--from", str(karras), "--model", str(model_dir), "-o", str(again)])
    assert result.exit_code == 0, result.output
    assert "Schedule type Karras, which brushwork ignores" in result.output
    plain = runner.invoke(app, ["generate", "--from", str(made), "--model", str(model_dir), "-o", str(tmp_path / "p.png")])
    assert "Schedule type" not in plain.output
