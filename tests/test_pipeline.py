import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from sd_tiny import build_tiny_sd

import brushwork
from brushwork.errors import BrushworkError
from brushwork.generation import base, diffusion_model, registry
from brushwork.generation.auto import BrushworkPipeline
from brushwork.generation.output import GenerationCancelled
from brushwork.generation.samplers import SAMPLERS, resolve_sampler
from brushwork.hardware import CompiledModule

SMALL = dict(num_inference_steps=4, height=32, width=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "model", "v1")


@pytest.fixture(scope="module")
def pipe(model_dir):
    return BrushworkPipeline.from_pretrained(model_dir, device="cpu", dtype=torch.float32)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("sampler", ["dpm++", "euler_a", "ddim"])
def test_same_images_as_diffusers(model_dir, pipe, sampler):
    reference = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    reference.scheduler = SAMPLERS[sampler].from_config(pipe.model.scheduler_config)
    reference.set_progress_bar_config(disable=True)
    ours = pipe("a red circle", negative_prompt="blue", sampler=sampler, seed=11, guidance_scale=5.0,
                **SMALL).images[0]
    theirs = reference("a red circle", negative_prompt="blue", guidance_scale=5.0, output_type="pil",
                       generator=torch.Generator().manual_seed(11), **SMALL).images[0]
    assert pixels(ours).std() > 5  # a real image, not a flat one
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 2
    assert pipe.model.denoiser is None  # eager sampling runs diffusers' own UNet forward


def test_a_scheduler_config_that_does_not_say_gets_sds_clip_sample(model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    del config["clip_sample"]
    config_file.write_text(json.dumps(config))
    pipe = BrushworkPipeline.from_pretrained(folder, dtype=torch.float32)
    assert SAMPLERS["ddim"].from_config(pipe.model.scheduler_config).config.clip_sample is False


def test_seeds_reproduce_and_batch_matches_singles(pipe):
    batch = pipe("a red circle", num_images_per_prompt=3, seed=5, sampler="euler_a", **SMALL)
    assert batch.seeds == [5, 6, 7]
    assert len(batch.images) == 3 and batch.images[0].size == (32, 32)
    for k in range(3):
        single = pipe("a red circle", seed=5 + k, sampler="euler_a", **SMALL).images[0]
        assert np.abs(pixels(single) - pixels(batch.images[k])).max() <= 2
    again = pipe("a red circle", seed=5, sampler="euler_a", **SMALL).images[0]
    assert np.array_equal(pixels(again), pixels(pipe("a red circle", seed=5, sampler="euler_a", **SMALL).images[0]))
    assert np.abs(pixels(batch.images[0]) - pixels(batch.images[1])).max() > 10


def test_prompts_and_negative_prompts_matter(pipe):
    out = pipe(["a red circle", "a blue square"], seed=1, **SMALL)
    assert out.prompts == ["a red circle", "a blue square"] and out.negative_prompts == ["", ""]
    first = pipe("a red circle", seed=1, **SMALL).images[0]
    other_prompt = pipe("a blue square", seed=1, **SMALL).images[0]
    with_negative = pipe("a red circle", negative_prompt="green", seed=1, **SMALL).images[0]
    assert np.abs(pixels(first) - pixels(out.images[0])).max() <= 2
    assert np.abs(pixels(first) - pixels(other_prompt)).max() > 2
    assert np.abs(pixels(first) - pixels(with_negative)).max() > 2
    unconditional = pipe("", seed=1, **SMALL)
    assert unconditional.images[0].size == (32, 32)


def test_text_embeddings_stay_right_past_the_cache_bound(model_dir):
    """The embedding cache is bounded (256); a call whose prompts are partly cached must not lose them when the
    cache is trimmed: a server or a long --prompts file meets more distinct prompts than that."""
    model = BrushworkPipeline.from_pretrained(model_dir, device="cpu", dtype=torch.float32).model
    fresh = BrushworkPipeline.from_pretrained(model_dir, device="cpu", dtype=torch.float32).model
    model.encode([f"prompt {i}" for i in range(250)])
    prompts = ["prompt 3", "", "a new prompt"] + [f"another {i}" for i in range(10)]   # cached, then 11 new
    embeddings = model.encode(prompts)
    assert torch.equal(embeddings, fresh.encode(prompts))
    assert len(model._embedding_cache) <= 256


def test_random_seed_is_recorded_and_parameters(pipe):
    out = pipe("a red circle", guidance_scale=3, sampler="Euler a", **SMALL)
    seed = out.seeds[0]
    assert isinstance(seed, int)
    again = pipe("a red circle", guidance_scale=3, sampler="euler_a", seed=seed, **SMALL)
    assert np.array_equal(pixels(out.images[0]), pixels(again.images[0]))
    params = out.parameters(0)
    assert params["sampler"] == "Euler a" and params["seed"] == seed and params["cfg_scale"] == 3
    assert params["width"] == 32 and len(params["model_hash"]) == 10 and params["model"] == "model"


def test_output_types(pipe):
    assert pipe("x", seed=0, output_type="pt", **SMALL).images[0].shape == (3, 32, 32)
    array = pipe("x", seed=0, output_type="np", **SMALL).images[0]
    assert array.shape == (32, 32, 3) and 0 <= array.min() and array.max() <= 1


def test_callback_sees_every_step_and_can_cancel(pipe):
    steps = []

    def record(_pipe, step, timestep, kwargs):
        steps.append(step)
        assert kwargs["latents"].shape == (1, 4, 8, 8)
        return {}

    pipe("x", seed=0, callback_on_step_end=record, **SMALL)
    assert steps == [0, 1, 2, 3]
    with pytest.raises(GenerationCancelled):
        pipe("x", seed=0, callback_on_step_end=lambda *a: {"cancel": True}, **SMALL)


def test_sampler_names():
    assert resolve_sampler(None) == "dpm++"
    assert resolve_sampler("DPM++ 2M") == "dpm++"
    assert resolve_sampler("Euler a") == "euler_a"
    assert resolve_sampler("Heun") == "heun"
    with pytest.raises(BrushworkError, match="known samplers: dpm\\+\\+"):
        resolve_sampler("plms")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_inference_steps=0), "steps"),
    (dict(guidance_scale=float("nan")), "guidance"),
    (dict(guidance_scale=float("inf")), "guidance"),
    (dict(guidance_scale=-1), "guidance"),
    (dict(num_images_per_prompt=0), "number of images"),
    (dict(num_images_per_prompt=65), "number of images"),
    (dict(height=30), "height must be a positive multiple of 4"),
    (dict(width=4096), "width must be at most"),
    (dict(sampler="nope"), "unknown sampler"),
])
def test_bad_arguments(pipe, kwargs, message):
    with pytest.raises(BrushworkError, match=message):
        pipe("x", **{**SMALL, **kwargs})


def test_long_prompt_warns(pipe):
    with pytest.warns(UserWarning, match="tokens long"):
        pipe("red circle " * 40, seed=0, **SMALL)


def test_missing_default_model(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "SHIPPED_MODELS_DIR", tmp_path / "none")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BrushworkError, match="no default model is installed"):
        BrushworkPipeline.from_pretrained()


def test_shipped_model_names_resolve(monkeypatch, tmp_path, model_dir):
    shipped = tmp_path / "models"
    shipped.mkdir()
    shutil.copytree(model_dir, shipped / "shapes")
    monkeypatch.setattr(registry, "SHIPPED_MODELS_DIR", shipped)
    monkeypatch.chdir(tmp_path)
    assert registry.shipped_models() == ["shapes"]
    assert BrushworkPipeline.from_pretrained().path == shipped / "shapes"
    assert BrushworkPipeline.from_pretrained("shapes").name == "shapes"
    (tmp_path / "shapes").mkdir()   # e.g. `brushwork data shapes --out shapes`: the default model is still shipped
    assert BrushworkPipeline.from_pretrained().path == shipped / "shapes"
    with pytest.raises(BrushworkError, match="not a model folder"):   # a path given by hand wins
        BrushworkPipeline.from_pretrained("shapes")
    with pytest.raises(BrushworkError, match=r"model not found: nope \(the models shipped with brushwork: shapes\)"):
        BrushworkPipeline.from_pretrained("nope")


def test_bad_model_folders(tmp_path, model_dir):
    with pytest.raises(BrushworkError, match="model not found"):
        BrushworkPipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(BrushworkError, match="not a model folder"):
        BrushworkPipeline.from_pretrained(tmp_path)

    listed = tmp_path / "listed"
    shutil.copytree(model_dir, listed)
    (listed / "scheduler" / "scheduler_config.json").write_text("[1, 2]")
    with pytest.raises(BrushworkError, match="must each hold a JSON object"):
        BrushworkPipeline.from_pretrained(listed)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(model_dir, corrupt)
    (corrupt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(BrushworkError, match="unet"):
        BrushworkPipeline.from_pretrained(corrupt)

    wrong = tmp_path / "wrong"
    shutil.copytree(model_dir, wrong)
    config = (wrong / "unet" / "config.json").read_text().replace('"cross_attention_dim": 64',
                                                                   '"cross_attention_dim": 48')
    (wrong / "unet" / "config.json").write_text(config)
    with pytest.raises(BrushworkError, match="unet"):
        BrushworkPipeline.from_pretrained(wrong)

    no_vae = tmp_path / "no_vae"
    shutil.copytree(model_dir, no_vae)
    shutil.rmtree(no_vae / "vae")
    with pytest.raises(BrushworkError, match="missing its vae"):
        BrushworkPipeline.from_pretrained(no_vae)


def test_unet_attention_outside_what_the_text_kv_processor_covers_keeps_diffusers_processors(model_dir):
    from brushwork.generation.fast_unet import Denoiser, TextKVAttnProcessor

    unet = BrushworkPipeline.from_pretrained(model_dir, dtype=torch.float32).model.unet
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        denoiser = Denoiser(unet)
        assert {type(p) for p in unet.attn_processors.values()} == {TextKVAttnProcessor}
        emb = denoiser.step_embeddings(torch.tensor([10]), text)[0]
        with_kv = denoiser(sample, emb, text, *denoiser.text_kv(text))
        called_directly = unet(sample, 10, encoder_hidden_states=text).sample  # projects the text itself
        torch.testing.assert_close(called_directly, with_kv)
        unet.set_attn_processor(AttnProcessor2_0())
        reference = unet(sample, 10, encoder_hidden_states=text).sample
        torch.testing.assert_close(with_kv, reference, rtol=1e-5, atol=1e-5)

        next(m for m in unet.modules() if isinstance(m, Attention)).rescale_output_factor = 2.0
        plain = Denoiser(unet)
        assert plain.cross_attentions == [] and plain.text_kv(text) == []
        assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}


def test_denoiser_with_step_embeddings_made_ahead_equals_the_diffusers_unet(model_dir):
    from diffusers import UNet2DConditionModel

    from brushwork.generation.fast_unet import Denoiser

    unet = BrushworkPipeline.from_pretrained(model_dir, dtype=torch.float32).model.unet
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    timesteps = torch.tensor([999, 500, 3])
    # the tests' SD-style UNet, one with the shipped models' pooled-text embedding, one that centres its input, and
    # a few-step model's, which takes a guidance embedding per image (time_cond_proj_dim) beside the pooled text
    variants = [unet] + [UNet2DConditionModel.from_config({**unet.config, **change}).eval() for change in
                         ({"addition_embed_type": "text", "addition_embed_type_num_heads": 2},
                          {"center_input_sample": True},
                          {"addition_embed_type": "text", "addition_embed_type_num_heads": 2,
                           "time_cond_proj_dim": 16})]
    with torch.no_grad():
        for model in variants:
            denoiser = Denoiser(model)
            guidance = torch.randn(2, 16) if model.config.time_cond_proj_dim else None
            embeddings = denoiser.step_embeddings(timesteps, text, guidance)
            for side in (8, 6):  # 6: the up blocks need their output sizes passed, as diffusers does
                sample = torch.randn(2, 4, side, side)
                for i, t in enumerate(timesteps):
                    expected = model(sample, t, encoder_hidden_states=text, timestep_cond=guidance,
                                     return_dict=False)[0]
                    actual = denoiser(sample, embeddings[i], text, *denoiser.text_kv(text))
                    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    labelled = UNet2DConditionModel.from_config({**unet.config, "class_embed_type": "timestep"})
    with pytest.raises(BrushworkError, match="needs class labels"):
        Denoiser(labelled)


@pytest.mark.slow
def test_compiled_pipeline_matches_eager_and_reloads_without_compiling(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BRUSHWORK_CACHE", str(tmp_path))
    eager = BrushworkPipeline.from_pretrained(model_dir, dtype=torch.float32)
    compiled = BrushworkPipeline.from_pretrained(model_dir, dtype=torch.float32, compile=True)
    assert isinstance(compiled.model.denoise, CompiledModule) and isinstance(compiled.model.decode, CompiledModule)
    assert compiled.compiled and not eager.compiled
    a = pixels(eager("a red circle", seed=3, **SMALL).images[0])
    b = pixels(compiled("a red circle", seed=3, **SMALL).images[0])
    assert np.abs(a - b).max() <= 2
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "compiled").glob("*.pt2")) == ["unet", "vae"]

    monkeypatch.setattr(CompiledModule, "_compile", lambda *args: pytest.fail("compiled again"))
    reloaded = BrushworkPipeline.from_pretrained(model_dir, dtype=torch.float32, compile=True)
    assert np.array_equal(pixels(reloaded("a red circle", seed=3, **SMALL).images[0]), b)


def test_compile_casts_the_cpu_unet_to_a_low_dtype_and_fuses_its_projections(model_dir, monkeypatch):
    # Compilation itself is covered by the slow test above; here only what compile() does before it.
    monkeypatch.setattr(diffusion_model, "CompiledModule", lambda module, name: module)
    pipe = BrushworkPipeline.from_pretrained(model_dir, dtype=torch.bfloat16, compile=True)
    assert pipe.model.unet.dtype == torch.bfloat16 and pipe.model.vae.dtype == torch.bfloat16
    half = BrushworkPipeline.from_pretrained(model_dir, dtype=torch.float16, compile=True)
    assert half.model.unet.dtype == torch.float16 and half.model.vae.dtype == torch.float32  # fp16 VAEs overflow
    assert all(hasattr(module, "to_qkv") for name, module in pipe.model.unet.named_modules()
               if name.endswith("attn1"))
    assert pipe.model.denoiser.cross_attentions  # the compiled step makes the text's keys and values once per image
    image = pipe("a red circle", seed=0, **SMALL).images[0]
    assert image.size == (32, 32)
    monkeypatch.setattr(base, "cpu_has_native_bf16", lambda: False)
    assert BrushworkPipeline.from_pretrained(model_dir, compile=True).dtype == torch.float32
    monkeypatch.setattr(base, "cpu_has_native_bf16", lambda: True)
    assert BrushworkPipeline.from_pretrained(model_dir, compile=True).dtype == torch.bfloat16
    assert BrushworkPipeline.from_pretrained(model_dir).dtype == torch.float32


def test_a_list_of_seeds_gives_each_image_its_own(pipe):
    out = pipe(["a red circle", "a blue square"], seed=[17, 4], **SMALL)
    assert out.seeds == [17, 4]
    alone = pipe("a blue square", seed=4, **SMALL).images[0]
    assert np.abs(pixels(out.images[1]) - pixels(alone)).max() <= 2
    with pytest.raises(BrushworkError, match="got 1 seeds for 2 images"):
        pipe(["a red circle", "a blue square"], seed=[1], **SMALL)



def _module_imports() -> dict[str, set[str]]:
    """brushwork module -> the brushwork modules it imports, at module level or inside functions."""
    root = Path(brushwork.__file__).parent
    names = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    graph = {}
    for name, path in names.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        graph[name] = {m for m in imported if m in names and m != name}
    return graph


def test_generation_imports_without_a_cycle_and_without_eval():
    graph = _module_imports()
    for name in graph:  # nothing a module imports leads back to it
        seen, todo = set(), list(graph[name])
        while todo:
            module = todo.pop()
            assert module != name, f"{name} is in an import cycle"
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        if name.startswith("brushwork.generation"):
            assert not [m for m in seen if m.startswith("brushwork.eval")], name
