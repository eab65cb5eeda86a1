"""Few-step diffusion: `brushwork train distill` (latent consistency distillation) and sampling its models in
brushwork and in diffusers' LatentConsistencyModelPipeline."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from sd_tiny import add_tiny_clip, build_tiny_lcm, build_tiny_sd
from typer.testing import CliRunner

from brushwork.cli import app
from brushwork.errors import BrushworkError
from brushwork.generation.auto import BrushworkPipeline
from brushwork.models.gan import GAN_KIND
from brushwork.pnginfo import read_parameters

runner = CliRunner()
DISTILL = ["--data", "shapes", "--n", "8", "--batch-size", "4", "--sample-every", "0", "--checkpoint-every", "2"]


def distill(*args: str):
    return runner.invoke(app, ["train", "distill", *DISTILL, *args])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("teacher") / "teacher", "v2")   # v-prediction


@pytest.fixture(scope="module")
def distilled(teacher):
    out = teacher.parent / "fast"
    result = distill("--model", str(teacher), "--steps", "4", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    """A few-step folder whose guidance projection is random, so that guidance changes the images."""
    return build_tiny_lcm(tmp_path_factory.mktemp("fast") / "fast")


def unet_weights(model) -> dict[str, torch.Tensor]:
    return load_file(model / "unet" / "diffusion_pytorch_model.safetensors")


def test_distill_writes_an_lcm_folder_with_the_teachers_schedule(teacher, distilled):
    scheduler = json.loads((distilled / "scheduler" / "scheduler_config.json").read_text())
    taught = json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["original_inference_steps"] == 50
    assert scheduler["timestep_scaling"] == 10.0
    assert "algorithm_type" not in scheduler and "solver_order" not in scheduler   # the teacher's DPM++ settings
    for key in ("prediction_type", "beta_schedule", "beta_start", "beta_end", "num_train_timesteps"):
        assert scheduler[key] == taught[key], key
    student, teacher_unet = (UNet2DConditionModel.load_config(m / "unet") for m in (distilled, teacher))
    assert student.pop("time_cond_proj_dim") == 256 and teacher_unet.pop("time_cond_proj_dim") is None
    assert {k: v for k, v in student.items() if not k.startswith("_")} == \
        {k: v for k, v in teacher_unet.items() if not k.startswith("_")}
    index = json.loads((distilled / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline"
    trained, initial = unet_weights(distilled), unet_weights(teacher)
    assert trained["time_embedding.cond_proj.weight"].abs().max() > 0   # the guidance input learned
    assert not torch.equal(trained["conv_out.weight"], initial["conv_out.weight"])
    log_path = teacher.parent / "fast.runs" / "distill" / "log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert log[-1]["step"] == 4 and np.isfinite(log[-1]["loss"])
    facts = json.loads((distilled / "training.json").read_text())
    assert facts["kind"] == "lcm" and facts["steps"] == 4 and facts["teacher"] == str(teacher)
    pipe = BrushworkPipeline.from_pretrained(distilled, device="cpu", dtype=torch.float32)
    image = np.asarray(pipe("a red circle", seed=1).images[0], dtype=np.int16)
    assert pipe.resolve_steps(None) == 4 and image.std() > 1


def test_resume_goes_on_exactly(teacher, distilled, tmp_path):
    out = tmp_path / "fast"
    assert distill("--model", str(teacher), "--steps", "2", "--out", str(out)).exit_code == 0
    result = distill("--model", str(teacher), "--steps", "4", "--out", str(out), "--resume")
    assert result.exit_code == 0, result.output
    resumed, straight = unet_weights(out), unet_weights(distilled)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_export_writes_a_distill_checkpoint_as_a_few_step_pipeline(teacher, distilled, tmp_path):
    last = sorted((teacher.parent / "fast.runs" / "distill" / "checkpoints").glob("step-*"))[-1]
    result = runner.invoke(app, ["train", "export", str(last), "--out", str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output   # the finished run's folder has the teacher's encoders
    exported = LatentConsistencyModelPipeline.from_pretrained(tmp_path / "exported", safety_checker=None)
    final = LatentConsistencyModelPipeline.from_pretrained(distilled, safety_checker=None)
    # the last checkpoint is the model the run ended with: the student's EMA UNet (not its target network)
    assert all(torch.equal(a, exported.unet.state_dict()[k]) for k, a in final.unet.state_dict().items())
    assert dict(exported.scheduler.config) == dict(final.scheduler.config)
    assert json.loads((tmp_path / "exported" / "training.json").read_text())["kind"] == "lcm"

    mid_run = shutil.copytree(last.parent.parent.parent, tmp_path / "going.runs")
    checkpoint = sorted((mid_run / "distill" / "checkpoints").glob("step-*"))[0]
    result = runner.invoke(app, ["train", "export", str(checkpoint), "--out", str(tmp_path / "early")])
    assert result.exit_code == 1 and "pass --model, the teacher" in " ".join(result.output.split()), result.output
    result = runner.invoke(app, ["train", "export", str(checkpoint), "--out", str(tmp_path / "early"),
                                 "--model", str(teacher)])
    assert result.exit_code == 0, result.output
    pipe = BrushworkPipeline.from_pretrained(tmp_path / "early", device="cpu", dtype=torch.float32)
    assert pipe.resolve_steps(None) == 4 and np.asarray(pipe("a red circle", seed=1).images[0]).std() > 1


def test_brushwork_and_diffusers_make_the_same_pixels(fast):
    pipe = BrushworkPipeline.from_pretrained(fast, device="cpu", dtype=torch.float32)
    calls = []
    pipe.model.unet.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    reference = LatentConsistencyModelPipeline.from_pretrained(fast, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a blue square"]
    images = {}
    for steps, guidance in ((4, 5.0), (1, 5.0), (4, 9.0)):
        ours = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, seed=3).images
        theirs = reference(prompts, num_inference_steps=steps, guidance_scale=guidance,
                           generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images
        for a, b in zip(ours, theirs):
            assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1
        images[steps, guidance] = np.asarray(ours[0], dtype=np.int16)
    assert calls[:5] == [2] * 4 + [2]   # one UNet call a step, no CFG batch
    assert np.abs(images[4, 5.0] - images[4, 9.0]).max() > 10   # the guidance goes in through the UNet


def test_generate_takes_a_few_step_model_at_4_steps(fast, tmp_path):
    out = tmp_path / "fast.png"
    result = runner.invoke(app, ["generate", "a red circle", "--model", str(fast), "--seed", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    params = read_parameters(out)
    assert (params["steps"], params["sampler"]) == (4, "LCM")
    again = tmp_path / "again.png"
    result = runner.invoke(app, ["generate", "a red circle", "--model", str(fast), "--seed", "2", "--steps", "4",
                                 "--sampler", "lcm", "-o", str(again)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(read_image(out)), np.asarray(read_image(again)))


def read_image(path):
    import PIL.Image

    return PIL.Image.open(path).convert("RGB")


@pytest.mark.parametrize("kwargs, message", [
    ({"sampler": "dpm++"}, "samples with lcm only"),
    ({"negative_prompt": "blue"}, "no negative prompt"),
    ({"layout": True}, "layout guidance"),
    ({"num_inference_steps": 51}, "at most 50 steps"),
])
def test_what_a_few_step_model_cannot_do(fast, kwargs, message):
    pipe = BrushworkPipeline.from_pretrained(fast, device="cpu", dtype=torch.float32)
    with pytest.raises(BrushworkError, match=message):
        pipe("a red circle above a blue square", seed=1, **kwargs)


def test_the_lcm_sampler_needs_a_few_step_model(teacher):
    pipe = BrushworkPipeline.from_pretrained(teacher, device="cpu", dtype=torch.float32)
    with pytest.raises(BrushworkError, match="lcm sampler needs a few-step model"):
        pipe("a red circle", sampler="lcm", num_inference_steps=2, seed=1)


def test_bad_teachers_and_folders_are_one_line_errors(teacher, fast, tmp_path):
    gan = tmp_path / "gan"
    gan.mkdir()
    (gan / "config.json").write_text(json.dumps({"brushwork_kind": GAN_KIND}))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    cases = [(["--model", str(tmp_path / "nowhere")], "model not found"),
             (["--model", str(gan)], "is a GAN"),
             (["--model", str(fast)], "already a few-step"),
             (["--model", str(teacher), "--w-min", "9"], "--w-min <= --w-max"),
             (["--model", str(teacher), "--out", str(taken)], "is not empty")]
    for args, message in cases:
        out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
        result = distill(*args, *out)
        assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["train", "distill", "--model", str(teacher), "--out", str(tmp_path / "out2")])
    assert result.exit_code == 1 and "pass --data" in result.output   # a teacher without training.json


def test_a_shipped_few_step_model_is_found_by_name(fast, tmp_path, monkeypatch):
    from brushwork.generation import registry

    shutil.copytree(fast, tmp_path / "models" / "shapes-fast")
    monkeypatch.setattr(registry, "SHIPPED_MODELS_DIR", tmp_path / "models")
    assert "shapes-fast" in registry.shipped_models()
    pipe = BrushworkPipeline.from_pretrained("shapes-fast", device="cpu", dtype=torch.float32)
    assert pipe.path == tmp_path / "models" / "shapes-fast"
    assert pipe.few_step and pipe.resolve_steps(None) == 4 and pipe.default_sampler == "lcm"


def test_eval_takes_a_few_step_model_at_its_own_steps(fast, tmp_path):
    model = add_tiny_clip(shutil.copytree(fast, tmp_path / "fast"))
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--model", str(model), "--data", "shapes", "--n", "2", "--per-prompt", "1",
                                 "--batch-sizes", "", "--train-images", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["models"][0]["steps"] == 4 and report["models"][0]["metrics"]["seconds_per_image"] > 0


@pytest.mark.slow
def test_a_compiled_few_step_model_draws_as_the_eager_one(fast, tmp_path, monkeypatch):
    monkeypatch.setenv("BRUSHWORK_CACHE", str(tmp_path))
    eager = BrushworkPipeline.from_pretrained(fast, device="cpu", dtype=torch.float32)
    compiled = BrushworkPipeline.from_pretrained(fast, device="cpu", dtype=torch.float32, compile=True)
    for guidance in (2.0, 8.0):
        a, b = (np.asarray(p(["a red circle"], guidance_scale=guidance, seed=1).images[0], dtype=np.int16)
                for p in (eager, compiled))
        assert np.abs(a - b).max() <= 2
