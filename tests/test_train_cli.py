import json
import shutil
import types

import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from brushwork.cli import app
from brushwork.errors import BrushworkError
from brushwork.train.options import runs_folder
from brushwork.train.recipe import shapes_reconstruction_accuracy

runner = CliRunner()
TINY = ["--data", "shapes", "--size", "tiny", "--n", "64"]



def _train(*args: str):
    return runner.invoke(app, ["train", *args])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny"
    # run as `python -m brushwork.cli`: the card still names the command as `brushwork train ...`
    result = runner.invoke(app, ["train", *TINY, "--out", str(out), "--max-minutes", "120"],
                           prog_name="python -m brushwork.cli")
    assert result.exit_code == 0, result.output
    return out


def test_recipe_writes_a_pipeline_that_generates(model):
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "clip", "README.md", "model_index.json"):
        assert (model / part).exists(), part
    index = json.loads((model / "model_index.json").read_text())
    assert index["requires_safety_checker"] is False and index["safety_checker"] == [None, None]
    pipe = StableDiffusionPipeline.from_pretrained(model)   # offline: conftest sets HF_HUB_OFFLINE
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"      # the default recipe's target
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    for sampler in (DDIMScheduler, DDPMScheduler):   # SD's settings, not these samplers' pixel-space defaults
        other = sampler.from_config(pipe.scheduler.config)
        assert other.config.clip_sample is False and getattr(other.config, "set_alpha_to_one", False) is False
    assert pipe.vae.config.scaling_factor == 1.0   # latents normalised per channel inside the VAE
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_model_card_and_run_dirs(model):
    card = (model / "README.md").read_text()
    assert "`brushwork train --data shapes --out " in card and "--size tiny --n 64 --max-minutes 120`" in card
    facts = json.loads((model / "training.json").read_text())
    assert facts["command_wall_time_s"] >= sum(stage["train_time_s"] for stage in facts["stages"].values())
    assert f"- Wall time of the last command: {facts['command_wall_time_s'] / 60:.1f} min" in card
    for stage in ("clip", "vae", "unet"):
        assert f"| {stage} |" in card
        assert (model.parent / "tiny.runs" / stage / "log.jsonl").is_file()
    assert not (model / "runs").exists()   # nothing pickled inside the folder one shares
    assert facts["stages"]["unet"]["steps"] == 6 and facts["n"] == 64
    assert 0.0 <= facts["stages"]["vae"]["reconstructions_exact"] <= 1.0
    assert "of held-out VAE reconstructions" in (model / "README.md").read_text()


def test_model_card_has_hub_metadata(model):
    card = ModelCard.load(model / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.license == "apache-2.0" and card.data.datasets == ["shapes"]
    assert {"brushwork", "text-to-image"} <= set(card.data.tags) and card.data.base_model is None
    assert card.text.lstrip().startswith("# brushwork model (tiny)")


def test_resume_of_a_finished_model_and_changed_settings(model):
    result = _train(*TINY, "--out", str(model), "--resume")
    assert result.exit_code == 0, result.output
    result = _train(*TINY, "--out", str(model), "--resume", "--batch-size", "4")
    assert result.exit_code == 1 and "batch_size: 8 -> 4" in result.output


def test_stages_one_at_a_time(tmp_path):
    out = str(tmp_path / "m")
    for stage in ("clip", "vae", "unet"):
        result = _train(stage, *TINY, "--out", out, "--steps", "2")
        assert result.exit_code == 0, result.output
    assert StableDiffusionPipeline.from_pretrained(out).unet.config.sample_size == 16
    # A stage of another size does not fit the folder: one line names both sizes (it was a layer_norm traceback).
    result = _train("unet", "--data", "shapes", "--n", "64", "--out", out, "--steps", "2", "--resume")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "holds a model of size 'tiny' and this command trains size 'small'" in result.output
    # Training the UNet on for more steps resumes it; the model card lists every command, in order.
    result = _train("unet", *TINY, "--out", out, "--steps", "4", "--resume")
    assert result.exit_code == 0, result.output
    facts = json.loads((tmp_path / "m" / "training.json").read_text())
    assert facts["stages"]["unet"]["steps"] == 4
    assert [c.split()[2] for c in facts["commands"]] == ["clip", "vae", "unet", "unet"]
    card = (tmp_path / "m" / "README.md").read_text()
    assert card.index("train clip") < card.index("train vae") < card.index("--steps 4 --n 64 --resume")


@pytest.mark.parametrize("args, message", [
    (["--data", "shapes", "--size", "huge"], "unknown model size 'huge'"),
    (["--data", "/no/such/data", "--size", "tiny"], "unknown data set"),
    (["--data", "shapes", "--size", "tiny", "--resolution", "60"], "resolution 60"),
    (["--data", "shapes", "--size", "tiny", "--noise-schedule", "cubic"], "unknown noise schedule"),
    (["--data", "shapes", "--size", "tiny", "--vae-crop", "30"], "--vae-crop 30 must be a multiple of 4"),
    (["--data", "shapes", "--size", "tiny", "--vae-crop", "128"], "to the resolution, 64"),
])
def test_bad_input_fails_before_training(tmp_path, args, message):
    result = _train(*args, "--out", str(tmp_path / "m"))
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.runs" / "clip").exists()


def test_refuses_a_non_empty_folder_and_a_unet_without_encoders(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = _train(*TINY, "--out", str(tmp_path))
    assert result.exit_code == 1 and "not empty" in result.output
    result = _train("unet", *TINY, "--out", str(tmp_path / "fresh"))
    assert result.exit_code == 1 and "text_encoder" in result.output


def test_empty_data_folder(tmp_path):
    (tmp_path / "data").mkdir()
    result = _train("--data", str(tmp_path / "data"), "--size", "tiny", "--out", str(tmp_path / "m"))
    assert result.exit_code == 1 and "Error" in result.output


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _train(*TINY, "--out", str(blocker))
    assert result.exit_code == 1 and "is a file" in result.output


class _FakeVae(torch.nn.Module):
    """encode/decode stand-ins: `keep` returns the image itself, otherwise a grey image."""

    def __init__(self, keep: bool):
        super().__init__()
        self.keep = keep
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(sample_size=64)

    def encode(self, pixels):
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mode=lambda: pixels))

    def decode(self, latents):
        return types.SimpleNamespace(sample=latents if self.keep else torch.zeros_like(latents))


def test_shapes_reconstruction_gate_tells_a_faithful_vae_from_a_lossy_one():
    assert shapes_reconstruction_accuracy(_FakeVae(keep=True), n=64) == 1.0
    assert shapes_reconstruction_accuracy(_FakeVae(keep=False), n=64) == 0.0


def test_fine_tuning_starts_from_another_models_unet(model, tmp_path):
    out = tmp_path / "tuned"
    shutil.copytree(model, out, ignore=shutil.ignore_patterns("runs"))
    source = UNet2DConditionModel.from_pretrained(model / "unet")
    # A learning rate this small leaves the weights where they started: the saved UNet must be the source's.
    result = _train("unet", *TINY, "--out", str(out), "--steps", "2", "--init", str(model), "--lr", "1e-12")
    assert result.exit_code == 0, result.output
    tuned = UNet2DConditionModel.from_pretrained(out / "unet")
    for (name, a), b in zip(source.state_dict().items(), tuned.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    facts = json.loads((out / "training.json").read_text())
    assert facts["stages"]["unet"]["lr"] == 1e-12
    source_facts = facts["stages"]["unet"]["initialized_from"]
    assert source_facts["model"] == str(model) and source_facts["steps"] == 6
    assert f"started from the UNet of `{model}` after 6 steps" in (out / "README.md").read_text()
    assert ModelCard.load(out / "README.md").data.base_model == model.name
    assert "predicts" not in result.output   # same target as the source: nothing to say
    other_target = tmp_path / "epsilon"
    shutil.copytree(model, other_target, ignore=shutil.ignore_patterns("runs"))
    result = _train("unet", *TINY, "--out", str(other_target), "--steps", "2", "--init", str(model),
                    "--prediction", "epsilon")
    assert result.exit_code == 0, result.output
    assert "predicts v_prediction; this run trains it to predict epsilon (pass --prediction v_prediction" in result.output


def test_fine_tuning_refuses_a_unet_that_does_not_fit(model, tmp_path):
    out = tmp_path / "tuned"
    shutil.copytree(model, out, ignore=shutil.ignore_patterns("runs"))
    result = _train("unet", *TINY, "--out", str(out), "--init", str(tmp_path / "nowhere"))
    assert result.exit_code == 1 and "has no unet/ folder" in result.output
    other = tmp_path / "other"
    config = dict(UNet2DConditionModel.load_config(model / "unet"))
    UNet2DConditionModel.from_config({**config, "cross_attention_dim": 8}).save_pretrained(other / "unet")
    result = _train("unet", *TINY, "--out", str(out), "--init", str(other))
    assert result.exit_code == 1 and "cross_attention_dim 8 where this model needs" in result.output
    assert "Traceback" not in result.output
    result = _train("unet", *TINY, "--out", str(out), "--lr", "0")
    assert result.exit_code == 1 and "--lr must be a positive number" in result.output


def test_clip_near_misses_are_recorded_and_need_shapes_captions(tmp_path, photo_folder):
    out = tmp_path / "m"
    result = _train("clip", *TINY, "--out", str(out), "--steps", "10", "--hard-negatives", "1")
    assert result.exit_code == 0, result.output
    facts = json.loads((out / "training.json").read_text())
    assert facts["stages"]["clip"]["hard_negatives"] == 1.0
    assert "--hard-negatives 1`" in (out / "README.md").read_text()
    logged = json.loads((runs_folder(out) / "clip" / "log.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= logged["near_miss_accuracy"] <= 1.0
    result = _train("clip", *TINY, "--out", str(out), "--steps", "10", "--resume", "--hard-negatives", "0")
    assert result.exit_code == 1 and "hard_negatives: 1.0 -> 0.0" in result.output
    result = _train("clip", *TINY, "--out", str(tmp_path / "other"), "--hard-negatives", "1.5")
    assert result.exit_code == 1 and "share of the images, from 0 to 1" in result.output
    result = _train("clip", "--data", str(photo_folder), "--size", "tiny", "--out", str(tmp_path / "p"),
                    "--hard-negatives", "0.5")
    assert result.exit_code == 1 and "shapes grammar" in result.output and "Traceback" not in result.output
    # by default: near misses for shapes captions (the fixture's model), none for others, with a line that says so
    result = _train("clip", "--data", str(photo_folder), "--size", "tiny", "--out", str(tmp_path / "p"),
                    "--steps", "2")
    assert result.exit_code == 0 and "CLIP trains without near misses" in result.output, result.output
    assert "hard_negatives" not in json.loads((tmp_path / "p" / "training.json").read_text())["stages"]["clip"]


def test_near_misses_are_on_by_default_for_shapes(model):
    assert json.loads((model / "training.json").read_text())["stages"]["clip"]["hard_negatives"] == 1.0


def test_config_file_with_flags_overriding_it(tmp_path):
    config = tmp_path / "clip.toml"
    config.write_text('data = "shapes"\nsize = "tiny"\nn = 64\nsteps_clip = 50\nhard_negatives = 1\n')
    out = tmp_path / "m"
    result = _train("clip", "--config", str(config), "--out", str(out), "--steps", "2")
    assert result.exit_code == 0, result.output
    facts = json.loads((out / "training.json").read_text())
    assert facts["stages"]["clip"]["steps"] == 2 and facts["stages"]["clip"]["hard_negatives"] == 1.0
    # the card's command stands alone: the file's options written out as flags
    command = facts["commands"][0]
    assert "--config" not in command and "--size tiny --steps 2 --n 64" in command
    assert command.endswith("--hard-negatives 1")


@pytest.mark.parametrize("text, message", [
    ('data = "shapes"\nbogus = 1\nuncond_weight = 1.0\n', "has unknown keys: bogus, uncond_weight. Known keys: data,"),
    ('seed = "zero"\n', "seed must be int, got 'zero'"),
    ('size = \n', "is not valid"),
])
def test_config_file_errors_are_one_line(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = _train("--config", str(config), "--out", str(tmp_path / "m"))
    assert result.exit_code == 1 and message in result.output, result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_gan_reads_yaml_and_its_old_hard_negatives_flag_still_works(tmp_path):
    config = tmp_path / "gan.yaml"
    config.write_text("data: shapes\ntext_model: shapes\nsize: tiny\nmismatch_share: 2.0\n")
    result = _train("gan", "--config", str(config), "--out", str(tmp_path / "g"))
    assert result.exit_code == 1 and "--mismatch-share is a share" in result.output and "got 2.0" in result.output
    result = _train("gan", "--config", str(config), "--out", str(tmp_path / "g"), "--hard-negatives", "1.5")
    assert result.exit_code == 1 and "got 1.5" in result.output
    assert "`train gan --hard-negatives` is now --mismatch-share" in result.output
    result = _train("gan", "--config", str(config), "--out", str(tmp_path / "g"), "--hard-negatives", "1.5",
                    "--mismatch-share", "3")
    assert result.exit_code == 1 and "got 3.0" in result.output   # the new name wins
    help_text = _train("gan", "--help").output
    assert "--mismatch-share" in help_text and "--hard-negatives" not in help_text


def test_same_command_and_seed_give_the_same_weights(model, tmp_path):
    """A second run of the fixture's command, in a fresh process, writes bit-identical weights."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    again = tmp_path / "again"
    # One thread, as conftest sets for this process: float sums split over other thread counts round otherwise.
    subprocess.run([sys.executable, "-m", "brushwork.cli", "train", *TINY, "--out", str(again)], check=True,
                   capture_output=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    files = sorted(p.relative_to(model) for p in model.glob("[!r]*/*.safetensors"))
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors"} <= {str(f) for f in files}
    for name in files:
        first, second = load_file(model / name), load_file(again / name)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), name


@pytest.mark.parametrize("args, least", [((), 7), (("unet",), 1)])
def test_a_budget_too_small_for_a_stage_names_the_minimum(tmp_path, args, least):
    result = _train(*args, *TINY, "--out", str(tmp_path / "m"), "--max-minutes", "0.5")
    assert result.exit_code == 1 and f"give at least {least} minutes" in result.output, result.output
    assert "Traceback" not in result.output


def test_the_budget_is_split_across_the_stages_of_the_command(tmp_path):
    from brushwork.train.recipe import RecipeConfig, plan

    p = plan(RecipeConfig(data="shapes", size="tiny", n=64, out=tmp_path / "m", max_minutes=10))
    ends = {stage: p.stop_at(stage) - p.started for stage in ("clip", "vae", "unet")}
    # 15% / 20% / 65% of 600 s, each less 5% of its share (at most a minute) for the work after training
    assert ends == pytest.approx({"clip": 90 - 4.5, "vae": 210 - 6, "unet": 600 - 19.5})
    by_default = plan(RecipeConfig(data="shapes", size="tiny", n=64, out=tmp_path / "n"))
    assert by_default.stop_at("unet") - by_default.started == pytest.approx(150 * 60 - 60)   # the one command's 150
    assert plan(RecipeConfig(data="shapes", size="tiny", n=64, out=tmp_path / "o", max_minutes=0)).stop_at("unet") is None


def test_the_budget_counts_from_the_command_start_not_from_planning(tmp_path, monkeypatch):
    import time

    from brushwork.train import recipe

    planned = {}

    def record_plan(config, stages, started=None):
        planned["started"], planned["at"] = started, time.time()
        raise BrushworkError("planned")

    monkeypatch.setattr(recipe, "plan", record_plan)
    before = time.time()
    result = _train(*TINY, "--out", str(tmp_path / "m"), "--max-minutes", "10")
    assert result.exit_code == 1 and "planned" in result.output
    # the command's start, noted before it imported torch and handed down: not None (which means "now")
    assert planned["started"] is not None and before <= planned["started"] < planned["at"]


def test_compile_reaches_the_unet_stage_only(tmp_path):
    from brushwork.train.recipe import RecipeConfig, _train_config, plan

    compiled = plan(RecipeConfig(data="shapes", size="tiny", n=64, out=tmp_path / "m", compile=True))
    # the VAE measured slower compiled; CLIP's batches change shape every step, so dynamo recompiles until it gives up
    assert {stage: _train_config(compiled, stage).compile for stage in ("clip", "vae", "unet")} == {
        "clip": False, "vae": False, "unet": True}
    eager = plan(RecipeConfig(data="shapes", size="tiny", n=64, out=tmp_path / "n"))
    assert not any(_train_config(eager, stage).compile for stage in ("clip", "vae", "unet"))


def test_compile_without_a_cpp_compiler_is_a_clear_error(tmp_path, monkeypatch):
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    def no_compiler():
        raise InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    result = _train(*TINY, "--out", str(tmp_path / "m"), "--compile")
    assert result.exit_code == 1 and "compiling needs a C++ compiler" in result.output
    assert "train without --compile" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m" / "unet").exists()


def test_each_stage_has_its_own_batch_and_batch_size_sets_them_all(tmp_path):
    from brushwork.train.recipe import RecipeConfig, plan

    assert plan(RecipeConfig(data="shapes", n=64, out=tmp_path / "m")).batch_sizes == {"clip": 64, "vae": 16, "unet": 64}
    given = plan(RecipeConfig(data="shapes", n=64, out=tmp_path / "n", batch_size=32))
    assert given.batch_sizes == {"clip": 32, "vae": 32, "unet": 32}
    result = _train("--data", "shapes", "--n", "64", "--out", str(tmp_path / "o"), "--gradient-accumulation-steps", "32")
    assert result.exit_code == 1 and "The vae stage's batch of 16 images must be a multiple" in result.output


def test_the_vae_trains_on_crops_of_half_the_resolution_by_default(tmp_path):
    from brushwork.train.recipe import RecipeConfig, plan

    assert plan(RecipeConfig(data="shapes", size="tiny", n=64, out=tmp_path / "m")).config.vae_crop == 32
    assert plan(RecipeConfig(data="shapes", size="tiny", n=64, out=tmp_path / "n", resolution=128)).config.vae_crop == 64
    assert plan(RecipeConfig(data="shapes", size="tiny", n=64, out=tmp_path / "o", vae_crop=64)).config.vae_crop == 64


def test_a_negative_budget_is_refused(tmp_path):
    result = _train(*TINY, "--out", str(tmp_path / "m"), "--max-minutes", "-5")
    assert result.exit_code == 1 and "0 for no time limit" in result.output, result.output


def test_train_reports_skipped_files_like_inspect(tmp_path, photo_folder):
    (photo_folder / "2.png").write_bytes(b"not an image")
    (photo_folder / "3.png").write_bytes(b"")
    with (photo_folder / "metadata.jsonl").open("a") as metadata:
        metadata.write(json.dumps({"file_name": "2.png", "text": "broken"}) + "\n")
        metadata.write(json.dumps({"file_name": "3.png", "text": 7}) + "\n")   # a number is a caption
    inspected = runner.invoke(app, ["data", "inspect", str(photo_folder)])
    out = tmp_path / "m"
    result = _train("clip", "--data", str(photo_folder), "--size", "tiny", "--out", str(out), "--steps", "1",
                    "--batch-size", "2")
    assert result.exit_code == 0, result.output
    for line in ("usable image-caption pairs: 2", "problems: 2", "problems (not an image 2):",
                 "  2.png: not an image: unrecognised or corrupt header"):
        assert line in inspected.output.splitlines() and line in result.output.splitlines(), line
    facts = json.loads((out / "training.json").read_text())
    assert facts["n"] == 2 and facts["data_report"]["usable"] == 2 and facts["data_report"]["layout"] == "metadata"
    assert facts["data_report"]["reasons"] == {"not an image": 2}
    assert ["3.png", "not an image: unrecognised or corrupt header"] in facts["data_report"]["skipped_files"]
    card = (out / "README.md").read_text()
    assert "(metadata layout), 2 items at 64×64; 2 skipped (not an image 2; training.json lists them)" in card
    assert ModelCard.load(out / "README.md").data.license == "other"


def test_train_reads_a_split_of_a_parquet_set_with_named_columns(tmp_path):
    import datasets
    from PIL import Image

    (tmp_path / "hub" / "data").mkdir(parents=True)
    for split, colors in (("train", ("red", "blue")), ("test", ("green",))):
        rows = {"picture": [Image.new("RGB", (32, 32), c) for c in colors], "words": [f"a {c} wall" for c in colors]}
        datasets.Dataset.from_dict(rows).cast_column("picture", datasets.Image()).to_parquet(
            str(tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet"))
    args = ["clip", "--data", str(tmp_path / "hub"), "--size", "tiny", "--steps", "1", "--batch-size", "1"]
    result = _train(*args, "--out", str(tmp_path / "m"))
    assert result.exit_code == 1 and "no image column" in result.output and "--image-column" in result.output
    result = _train(*args, "--out", str(tmp_path / "m"), "--split", "test", "--image-column", "picture",
                    "--caption-column", "words")
    assert result.exit_code == 0, result.output
    assert "data set: " in result.output and "(parquet layout, split 'test' of train, test)" in result.output
    facts = json.loads((tmp_path / "m" / "training.json").read_text())
    assert facts["n"] == 1 and facts["data_report"]["split"] == "test"


def test_report_to_tensorboard_from_the_command_line(tmp_path):
    out = tmp_path / "m"
    result = _train("clip", *TINY, "--out", str(out), "--steps", "2", "--report-to", "tensorboard")
    assert result.exit_code == 0, result.output
    assert list((runs_folder(out) / "clip").glob("events.out.tfevents.*"))
    result = _train("clip", *TINY, "--out", str(tmp_path / "x"), "--report-to", "nowhere")
    assert result.exit_code == 1 and result.output.startswith("Error: --report-to must be one of")


def test_runs_go_beside_the_model_and_an_older_model_keeps_its_runs_inside(tmp_path):
    out = tmp_path / "m"
    result = _train("clip", *TINY, "--out", str(out), "--steps", "1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.runs" / "clip" / "checkpoints").is_dir() and not (out / "runs").exists()
    (tmp_path / "m.runs").rename(out / "runs")   # the layout of models trained before
    result = _train("clip", *TINY, "--out", str(out), "--steps", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert (out / "runs" / "clip" / "checkpoints" / "step-00000002").is_dir() and not (tmp_path / "m.runs").exists()


def test_diffusers_training_flags(tmp_path):
    """--lr-scheduler, --lr-warmup-steps, --gradient-accumulation-steps, --validation-prompts and
    --resume-from-checkpoint, named as in diffusers' training scripts."""
    out = tmp_path / "m"
    args = [*TINY, "--out", str(out), "--batch-size", "8", "--steps", "4", "--checkpoint-every", "2",
            "--lr-scheduler", "linear", "--lr-warmup-steps", "2", "--gradient-accumulation-steps", "2"]
    for stage in ("clip", "vae"):
        result = _train(stage, *args)
        assert result.exit_code == 0, result.output
    runs = runs_folder(out)
    log = [json.loads(line) for line in (runs / "vae" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["lr"] == 0.0  # linear decay to 0 at the last step
    state = json.loads((runs / "vae" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["config"]["grad_accum"] == 2 and state["config"]["lr_schedule"] == "linear"

    prompts = ["--validation-prompts", "a red circle", "--validation-prompts", "a blue square"]
    result = _train("unet", *args, "--sample-every", "2", *prompts)
    assert result.exit_code == 0, result.output
    grid = PIL.Image.open(runs / "unet" / "samples" / "step-00000002.png")
    assert grid.width == 2 * grid.height  # one image per validation prompt
    assert "--validation-prompts 'a red circle' --validation-prompts 'a blue square'" in (out / "README.md").read_text()

    named = runs / "unet" / "checkpoints" / "step-00000002"
    result = _train("unet", *args, "--resume-from-checkpoint", str(named))
    assert result.exit_code == 0, result.output
    assert "resuming from step-00000002; the later checkpoints (step-00000004) are replaced" in result.output
    wrong = _train("unet", *args, "--resume-from-checkpoint", str(runs / "vae" / "checkpoints" / "step-00000004"))
    assert wrong.exit_code == 1 and "checkpoint of the vae stage, which this command does not train" in wrong.output
    bad = _train("clip", *TINY, "--out", str(tmp_path / "n"), "--lr-scheduler", "exponential")
    assert bad.exit_code == 1 and "--lr-scheduler must be one of constant" in bad.output


def test_validation_prompts_in_a_config_file(tmp_path):
    from brushwork.train.options import RecipeConfig, read_config_file

    path = tmp_path / "c.yaml"
    path.write_text("validation_prompts: [a red circle, a blue square]\nlr_scheduler: constant\n")
    assert read_config_file(path, RecipeConfig) == {"validation_prompts": ["a red circle", "a blue square"],
                                                    "lr_scheduler": "constant"}
    path.write_text("validation_prompts: a red circle\n")
    with pytest.raises(BrushworkError, match="must be a list of strings"):
        read_config_file(path, RecipeConfig)


def test_attention_loss_is_on_for_shapes_regions_and_says_when_the_data_has_none(tmp_path, photo_folder):
    out = tmp_path / "m"
    assert _train("clip", "--data", str(photo_folder), "--size", "tiny", "--out", str(out), "--steps", "2").exit_code == 0
    assert _train("vae", "--data", str(photo_folder), "--size", "tiny", "--out", str(out), "--steps", "2").exit_code == 0
    result = _train("unet", "--data", str(photo_folder), "--size", "tiny", "--out", str(out), "--steps", "2",
                    "--prediction", "epsilon")
    assert result.exit_code == 0 and "trains without the attention loss" in result.output, result.output
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon" and not scheduler.get("rescale_betas_zero_snr")
    card = (out / "README.md").read_text()
    assert "--prediction epsilon`" in card and "zero-terminal-snr" not in card   # ZTSNR follows the target
    shapes = tmp_path / "s"
    assert _train("clip", *TINY, "--out", str(shapes), "--steps", "2").exit_code == 0
    assert _train("vae", *TINY, "--out", str(shapes), "--steps", "2").exit_code == 0
    result = _train("unet", *TINY, "--out", str(shapes), "--steps", "2")      # on by default
    assert result.exit_code == 0 and "without the attention loss" not in result.output, result.output
    logged = json.loads((runs_folder(shapes) / "unet" / "log.jsonl").read_text().splitlines()[-1])
    assert 0 < logged["attention"] <= 1


def test_export_writes_a_unet_checkpoint_as_a_pipeline(model, tmp_path):
    runs = runs_folder(model)
    last = sorted((runs / "unet" / "checkpoints").glob("step-*"))[-1]
    result = _train("export", str(last), "--out", str(tmp_path / "exported"))
    assert result.exit_code == 0, result.output
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "exported")
    final = StableDiffusionPipeline.from_pretrained(model)
    # the run's last checkpoint is the model the run ended with: the same EMA weights and sampling schedule
    assert final.unet.state_dict().keys() == exported.unet.state_dict().keys()
    assert all(torch.equal(a, exported.unet.state_dict()[k]) for k, a in final.unet.state_dict().items())
    assert dict(exported.scheduler.config) == dict(final.scheduler.config)
    assert (tmp_path / "exported" / "clip").is_dir()
    facts = json.loads((tmp_path / "exported" / "training.json").read_text())
    assert facts["exported_checkpoint"]["step"] == json.loads((last / "state.json").read_text())["step"]
    assert _train("export", str(last), "--out", str(tmp_path / "raw"), "--raw").exit_code == 0
    raw = UNet2DConditionModel.from_pretrained(tmp_path / "raw" / "unet")
    assert not all(torch.equal(a, raw.state_dict()[k]) for k, a in final.unet.state_dict().items())

    for args, message in [
        ([str(last), "--out", str(tmp_path / "exported")], "is not an empty folder"),
        ([str(sorted((runs / "vae" / "checkpoints").glob("step-*"))[-1]), "--out", str(tmp_path / "v")],
         "checkpoint of the vae stage"),
        ([str(last), "--out", str(tmp_path / "m"), "--model", str(tmp_path)], "has no text_encoder, tokenizer, vae/"),
        ([str(tmp_path), "--out", str(tmp_path / "n")], "state.json is missing"),
        ([str(last.parent / "step-7"), "--out", str(tmp_path / "n")], "is not a folder; the checkpoints in"),
    ]:
        result = _train("export", *args)
        assert result.exit_code == 1 and message in " ".join(result.output.split()), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "raw"]   # nothing half-written
