"""`brushwork eval` end to end: prompts and real images, generation, metrics, speed, sweeps, the report.

Every model sees the same prompts and seeds: image j of prompt i is made with seed `seed + i*k + j`
(k images per prompt), so figures and numbers compare model against model, setting against setting.
"""

import random
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import track

from brushwork.data.captions import all_captions
from brushwork.data.dataset import open_dataset
from brushwork.data.shapes import TASKS
from brushwork.data.transforms import to_image
from brushwork.errors import BrushworkError
from brushwork.eval import creativity, memorisation, metrics, relation_probe, report, speed
from brushwork.eval.checker import check
from brushwork.eval.features import RESIZE_CONVENTION, ClipEmbedder, InceptionFeatures
from brushwork.generation.auto import BrushworkPipeline
from brushwork.generation.best_of import MAX_BEST_OF
from brushwork.generation.registry import resolve_model, shipped_models, weights_hash
from brushwork.generation.samplers import resolve_sampler

SWEEP_KEYS = {"steps": int, "guidance": float, "sampler": str}
DATA_NAMES = ("shapes", "emoji")
REAL_SEED_OFFSET = 1_000_003   # shapes real images come from a seed other than training's
PRDC_K = 5
GRID_PROMPTS = 24
IMAGES_PER_CALL = 16
console = Console(stderr=True)


def _warn(notes: list[str], text: str) -> None:
    notes.append(text)
    console.print(f"[yellow]Warning:[/yellow] {text}", highlight=False)


@dataclass
class EvalConfig:
    models: list[Path]
    out: Path
    data: str = "shapes"
    n: int = 64                         # prompts per task (shapes) or prompts from the data set
    per_prompt: int = 2                 # images per prompt (>= 2 for intra-prompt diversity)
    steps: int | None = None            # None: each model's own (20; 4 for a few-step model)
    guidance: float = 5.0
    sampler: str | None = None
    seed: int = 0
    inception_weights: Path | None = None
    clip: Path | None = None
    sweeps: dict[str, list] = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    speed_repeats: int = 3
    device: str | None = None
    layout: bool = False                # layout guidance for position and counting prompts (diffusion models only)
    best_of: int = 1                    # each image the best of this many by the model's CLIP (pipeline's best_of)
    train_images: int | None = None     # training images searched for near-copies (None: all; 0: no search)
    ray: bool = False                   # generate on the Ray cluster the caller connected to (bulk.ray_run)
    actors: int | None = None           # Ray actors (default: as many as the cluster's CPUs)
    relation_probe: int = 200           # held-out position scenes for the UNet's relation probe (shapes; 0: none)


def parse_sweep(text: str) -> tuple[str, list]:
    """"steps=4,8,20" -> ("steps", [4, 8, 20])."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or key not in SWEEP_KEYS or not values.strip():
        raise BrushworkError(f"--sweep {text!r}: expected KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}, "
                             "e.g. --sweep steps=4,8,20,50")
    try:
        parsed = [SWEEP_KEYS[key](v.strip()) for v in values.split(",") if v.strip()]
    except ValueError:
        raise BrushworkError(f"--sweep {text!r}: values of {key} must be {SWEEP_KEYS[key].__name__}s") from None
    return key, parsed


def _check_data(data: str) -> None:
    if data not in DATA_NAMES and not Path(data).expanduser().exists():
        raise BrushworkError(f"unknown data set {data!r}: use shapes, emoji or a path to your own data folder")


def _shapes_prompts(n: int, seed: int, notes: list[str]) -> tuple[list[str], list[str]]:
    prompts, tasks = [], []
    for task in TASKS:
        captions = all_captions(task)
        if n > len(captions):
            _warn(notes, f"task {task} has only {len(captions)} prompts in the grammar; using all of them, not {n}")
        chosen = random.Random(f"{seed}-{task}").sample(captions, min(n, len(captions)))
        prompts += chosen
        tasks += [task] * len(chosen)
    return prompts, tasks


def _real_images(data: str, count: int, resolution: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    """`count` real images with their captions (shapes: fresh scenes; other data: a seeded sample of items)."""
    if data == "shapes":
        dataset = open_dataset("shapes", resolution, n=count, seed=seed + REAL_SEED_OFFSET, shapes_tasks=None)
        indices = range(count)
    else:
        dataset = open_dataset(data, resolution)
        indices = sorted(random.Random(seed).sample(range(len(dataset)), min(count, len(dataset))))
    images, texts = [], []
    for i in track(indices, description="loading real images"):
        item = dataset[i]
        images.append(to_image(item["pixel_values"]))
        texts.append(item["text"])
    return images, texts


def generate_images(pipe, prompts: list[str], per_prompt: int, steps: int, guidance: float, sampler: str | None,
                    seed: int, label: str, layout: bool = False, best_of: int = 1) -> tuple[list[Image.Image], float]:
    """per_prompt images of every prompt, prompt-major; image j of prompt i has seed seed + i*per_prompt + j.

    Returns the images and the wall seconds per image.
    """
    prompts_per_call = max(1, IMAGES_PER_CALL // per_prompt)
    images = []
    start = time.perf_counter()
    for first in track(range(0, len(prompts), prompts_per_call), description=label):
        batch = prompts[first:first + prompts_per_call]
        result = pipe(batch, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=per_prompt,
                      seed=seed + first * per_prompt, sampler=sampler, layout=layout, best_of=best_of)
        images += result.images
    return images, (time.perf_counter() - start) / len(images)


def generate_images_on_ray(model: Path, folder: Path, prompts: list[str], per_prompt: int, steps: int,
                           guidance: float, sampler: str | None, seed: int, layout: bool, best_of: int,
                           device: str | None, actors: int | None) -> tuple[list[Image.Image], float]:
    """generate_images' images (the same prompts and seeds) made by Ray actors into folder, without the watermark,
    and read back; a rerun into the same folder makes only what is missing."""
    from brushwork.bulk.jobs import Job
    from brushwork.bulk.ray_run import Settings, generate_on_ray, import_ray

    jobs = [Job(index=i * per_prompt + j, row=i + 1, prompt=prompt, seed=seed + i * per_prompt + j, steps=steps,
                guidance=guidance, model=str(model)) for i, prompt in enumerate(prompts) for j in range(per_prompt)]
    settings = Settings(out=str(folder), model=str(model), device=device or "cpu", batch_size=IMAGES_PER_CALL,
                        sampler=sampler, layout=layout, best_of=best_of, watermark=False)
    folder.mkdir(parents=True, exist_ok=True)
    made, seconds = generate_on_ray(import_ray(), jobs, settings, actors, console=console)
    images = [Image.open(folder / f"{job.index:05d}.png").convert("RGB") for job in jobs]
    return images, seconds / max(made, 1)


@dataclass
class Reference:
    """What every model is measured against: prompts, their embeddings, real-image features, extractors."""
    prompts: list[str]
    tasks: list[str] | None
    prompt_embeds: torch.Tensor
    real_features: torch.Tensor
    embedder: ClipEmbedder
    extractor: ClipEmbedder | InceptionFeatures
    per_prompt: int


def _faithfulness(images: list[Image.Image], prompts: list[str], tasks: list[str]) -> tuple[dict, list[bool]]:
    """Accuracy per task and overall; for position also "position_relation": how often the relation is right
    among the images whose two objects are, which tells a model that cannot draw both objects from one that
    draws them but places them at chance (1/4)."""
    results = [check(image, prompt) for image, prompt in track(list(zip(images, prompts)),
                                                                description="checking prompt faithfulness")]
    passed = [r.ok for r in results]
    groups = {task: [r.ok for r, t in zip(results, tasks) if t == task] for task in dict.fromkeys(tasks)}
    if "position" in groups:
        groups["position_relation"] = [r.ok for r, t in zip(results, tasks) if t == "position" and r.objects_ok]
    groups["overall"] = passed
    return {task: creativity.accuracy(hits) for task, hits in groups.items()}, passed


def quality_metrics(images: list[Image.Image], ref: Reference) -> tuple[dict, dict | None, list[bool] | None]:
    """Realism, diversity, text agreement and (shapes) faithfulness of images made for ref.prompts."""
    k = ref.per_prompt
    fake_features = ref.extractor.image_embeds(images)
    image_embeds = fake_features if ref.extractor is ref.embedder else ref.embedder.image_embeds(images)
    targets = torch.arange(len(ref.prompts)).repeat_interleave(k)
    values: dict = {"n_images": len(images), "n_real": len(ref.real_features)}
    values["fid"] = metrics.fid(ref.real_features, fake_features)
    values["kid_mean"], values["kid_std"] = metrics.kid(ref.real_features, fake_features)
    values["clip_score"] = metrics.clip_score(image_embeds, ref.prompt_embeds[targets])
    retrieval = metrics.retrieval_accuracy(image_embeds, ref.prompt_embeds, targets, ks=(1, 5))
    values["retrieval_top1"], values["retrieval_top5"] = retrieval[1], retrieval[5]
    if min(len(ref.real_features), len(fake_features)) > PRDC_K:
        values.update(metrics.prdc(ref.real_features, fake_features, k=PRDC_K))
    values["intra_prompt_diversity"] = (metrics.intra_prompt_diversity(fake_features.view(-1, k, fake_features.shape[1]))
                                        if k >= 2 else None)
    faithfulness, passed = None, None
    if ref.tasks is not None:
        faithfulness, passed = _faithfulness(images, [p for p in ref.prompts for _ in range(k)],
                                             [t for t in ref.tasks for _ in range(k)])
        values["faithfulness"] = faithfulness["overall"]
    return values, faithfulness, passed


def _sample_warnings(config: EvalConfig, n_images: int, n_real: int, dim: int, prompts: int) -> list[str]:
    notes = []
    if min(n_images, n_real) < 2 * dim:
        need = 2 * dim if config.data != "shapes" else -(-2 * dim // (len(TASKS) * config.per_prompt))
        what = "--n per task" if config.data == "shapes" else "images (raise --n or --per-prompt)"
        notes.append(f"FID/KID from {n_images} generated and {n_real} real images with {dim}-d features are "
                     f"unreliable (biased, singular covariance): use at least twice the feature dimension, "
                     f"{2 * dim} images each ({what}: {need}).")
    if min(n_images, n_real) <= PRDC_K:
        notes.append(f"precision/recall/density/coverage need more than {PRDC_K} images per set; skipped.")
    if config.per_prompt < 2:
        notes.append("intra-prompt diversity needs --per-prompt of at least 2; skipped.")
    if prompts <= 5:
        notes.append(f"retrieval top-5 needs more than 5 prompts (have {prompts}); skipped.")
    return notes


def _unique_names(paths: list[Path]) -> list[str]:
    names = []
    for path in paths:
        name = path.name or str(path)
        names.append(name if name not in names else f"{name} ({len(names) + 1})")
    return names


def _grid(images: list[Image.Image], prompts: list[str], per_prompt: int, passed: list[bool] | None) -> Image.Image:
    shown = np.unique(np.linspace(0, len(prompts) - 1, min(GRID_PROMPTS, len(prompts))).round().astype(int))
    captions = []
    for i in shown:
        verdict = "" if passed is None else (" [pass]" if passed[i * per_prompt] else " [fail]")
        captions.append(prompts[i] + verdict)
    return report.make_grid([images[i * per_prompt] for i in shown], captions)


def _evaluation_clip(config: EvalConfig) -> tuple[Path, Path]:
    """The CLIP folder for all embeddings and the tokenizer folder for it: --clip (a CLIPModel folder, or a
    model folder or shipped name holding clip/), else the clip/ of the first model that has one."""
    if config.clip:
        clip_dir = resolve_model(config.clip)
        clip_dir = clip_dir / "clip" if (clip_dir / "clip").is_dir() else clip_dir
        if not (clip_dir / "config.json").is_file():
            raise BrushworkError(f"--clip {config.clip}: not a CLIP model folder (no config.json)")
    else:
        with_clip = [path for path in config.models if (path / "clip").is_dir()]
        if not with_clip:
            raise BrushworkError(f"{config.models[0]} has no clip/ folder (the CLIP used for evaluation); pass --clip "
                                 "PATH to a transformers CLIPModel folder, or a brushwork model that has one")
        clip_dir = with_clip[0] / "clip"
    tokenizer_dir = clip_dir if (clip_dir / "vocab.json").is_file() else config.models[0] / "tokenizer"
    return clip_dir, tokenizer_dir


@dataclass
class CopySearch:
    """The training set's index, its copy thresholds, and (shapes) fresh scenes' copy rate as the reference."""
    index: memorisation.TrainingIndex
    data: str
    calibration: memorisation.Calibration
    fresh: dict | None

    def to_json(self) -> dict:
        fresh = self.fresh and memorisation.copy_summary(self.fresh)
        return {"data": self.data, "n_train": len(self.index), "index": str(self.index.path),
                "index_seconds": round(self.index.seconds, 1), "search": memorisation.SEARCH,
                "candidates": memorisation.CANDIDATES, "pixel_side": memorisation.PIXEL_SIDE,
                "calibration": self.calibration.to_json(), "fresh_data": fresh}


def _copy_search(config: EvalConfig, facts: dict, resolution: int, embedder: ClipEmbedder, clip_dir: Path,
                 fresh_images: list[Image.Image] | None) -> CopySearch:
    data = creativity.training_data(config.data, facts, resolution, config.train_images)
    key = memorisation.index_key(data, weights_hash(clip_dir), resolution)
    index = memorisation.build_index(data, embedder, key)
    calibration = memorisation.calibrate(index, config.seed)
    fresh = fresh_images and memorisation.find_copies(fresh_images, index, embedder)
    return CopySearch(index, config.data, calibration, fresh)


def _copies(search: CopySearch, images: list[Image.Image], prompts: list[str], embedder: ClipEmbedder,
            grid_path: Path) -> dict:
    """A model's copy rate and nearest training images, and the grid of its closest pairs."""
    found = memorisation.find_copies(images, search.index, embedder)
    cells, captions, pairs = memorisation.closest_pairs(found, images, prompts, search.index)
    report.make_grid(cells, captions).save(grid_path)
    return {"copies": memorisation.copy_summary(found), "closest_pairs": pairs, "closest_grid": grid_path.name}


def evaluate(config: EvalConfig) -> dict:
    """Runs the whole evaluation and writes report.html, report.json, grids and plots into config.out."""
    if not config.models:
        raise BrushworkError("give at least one --model PATH")
    config.models = [resolve_model(path) for path in config.models]   # shipped names ("shapes") -> folders
    for path in config.models:
        if not path.exists():
            raise BrushworkError(f"model not found: {path} (the models shipped with brushwork: "
                                 f"{', '.join(shipped_models()) or 'none'})")
    _check_data(config.data)
    if config.n < 1 or config.per_prompt < 1:
        raise BrushworkError(f"--n and --per-prompt must be at least 1 (got {config.n} and {config.per_prompt})")
    # Settings are checked before any work, so a bad sweep value does not fail after an hour of sampling.
    for steps in [1 if config.steps is None else config.steps] + config.sweeps.get("steps", []):
        if steps < 1:
            raise BrushworkError(f"steps must be at least 1, got {steps}")
    for guidance in [config.guidance] + config.sweeps.get("guidance", []):
        if guidance < 0:
            raise BrushworkError(f"guidance must be at least 0, got {guidance}")
    for sampler in [config.sampler] + config.sweeps.get("sampler", []):
        resolve_sampler(sampler)
    if config.train_images is not None and config.train_images < 0:
        raise BrushworkError(f"--train-images must be at least 0 (0 skips the near-copy search), got "
                             f"{config.train_images}")
    if config.relation_probe < 0:
        raise BrushworkError(f"--relation-probe must be at least 0 (0 skips the probe), got {config.relation_probe}")
    if not 1 <= config.best_of <= MAX_BEST_OF:
        raise BrushworkError(f"--best-of must be from 1 to {MAX_BEST_OF}, got {config.best_of}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    clip_dir, tokenizer_dir = _evaluation_clip(config)
    pipe = BrushworkPipeline.from_pretrained(config.models[0], device=config.device)
    device = str(pipe.device)
    embedder = ClipEmbedder(clip_dir, tokenizer_dir, device=device, label="CLIP" if config.clip else "brushwork CLIP")
    extractor = InceptionFeatures(config.inception_weights, device) if config.inception_weights else embedder

    if config.data == "shapes":
        prompts, tasks = _shapes_prompts(config.n, config.seed, notes)
        real_images, _ = _real_images("shapes", len(prompts) * config.per_prompt, pipe.default_size, config.seed)
    else:
        real_images, texts = _real_images(config.data, config.n, pipe.default_size, config.seed)
        prompts = list(dict.fromkeys(texts))
        tasks = creativity.grammar_tasks(prompts)     # a shapes data folder is scored like shapes
    if len(prompts) < 2:
        raise BrushworkError(f"data set {config.data!r} gives {len(prompts)} distinct caption(s); evaluation needs "
                             "at least 2")
    ref = Reference(prompts, tasks, embedder.text_embeds(prompts), extractor.image_embeds(real_images),
                    embedder, extractor, config.per_prompt)
    for note in _sample_warnings(config, len(prompts) * config.per_prompt, len(real_images), extractor.dim, len(prompts)):
        _warn(notes, note)
    if config.best_of > 1:
        _warn(notes, f"each image is the best of {config.best_of} by the model's CLIP: CLIP-based scores (CLIP score, "
                     "retrieval, and realism with CLIP features) are flattered when that CLIP is also the report's; "
                     "the faithfulness checker does not use CLIP.")

    names = _unique_names([Path(p) for p in config.models])
    facts = [creativity.training_facts(path) for path in config.models]
    hold_outs = [creativity.model_hold_out(fact) for fact in facts]
    for name, fact in zip(names, facts):
        mismatch = creativity.data_mismatch(name, fact, config.data)
        if mismatch:
            _warn(notes, mismatch)
    extra_prompts: list[str] = []
    if tasks is not None and any(hold_outs):
        extra_prompts, _ = creativity.held_out_prompts([h for h in hold_outs if h], prompts, config.n, config.seed)
    search = None
    if config.train_images != 0:
        search = _copy_search(config, facts[0], pipe.default_size, embedder, clip_dir,
                              real_images if config.data == "shapes" else None)
    image_prompts = [p for p in prompts for _ in range(config.per_prompt)]
    results, grids = [], []
    for index, (path, name) in enumerate(zip(config.models, names)):
        if index > 0:
            pipe = BrushworkPipeline.from_pretrained(path, device=config.device)
        if pipe.default_size != real_images[0].size[0]:
            _warn(notes, f"{name} makes {pipe.default_size}px images, the real images are {real_images[0].size[0]}px: "
                         f"both are resized by the stated convention before feature extraction.")
        # One untimed call first, so one-time costs (kernel selection, allocations) stay out of seconds per image.
        pipe(prompts[0], num_inference_steps=1, guidance_scale=config.guidance, seed=config.seed, sampler=config.sampler)
        cache: dict[tuple, tuple[list[Image.Image], float]] = {}
        layout = config.layout and pipe.supports_layout
        if config.layout and not layout:
            _warn(notes, f"layout guidance needs a diffusion model: {name} is sampled without it.")

        def run_setting(steps: int, guidance: float, sampler: str | None) -> tuple[list[Image.Image], float]:
            key = (steps, guidance, sampler)
            if key not in cache:
                label = f"{name}: steps={steps} guidance={guidance:g}" + (f" sampler={sampler}" if sampler else "")
                if config.ray:
                    folder = out / "images" / f"{index}-seed{config.seed}-steps{steps}-guidance{guidance:g}-{sampler or 'default'}"
                    cache[key] = generate_images_on_ray(path, folder, prompts, config.per_prompt, steps, guidance,
                                                        sampler, config.seed, layout, config.best_of, config.device,
                                                        config.actors)
                else:
                    cache[key] = generate_images(pipe, prompts, config.per_prompt, steps, guidance, sampler,
                                                 config.seed, label, layout, config.best_of)
            return cache[key]

        steps = pipe.resolve_steps(config.steps)
        images, seconds = run_setting(steps, config.guidance, config.sampler)
        values, faithfulness, passed = quality_metrics(images, ref)
        values["seconds_per_image"] = seconds
        grid_path = f"grid_{index}.png"
        _grid(images, prompts, config.per_prompt, passed).save(out / grid_path)
        grids.append(grid_path)

        speed_result = None
        if config.batch_sizes:
            speed_result = speed.measure_speed(
                lambda b: pipe([prompts[0]] * b, num_inference_steps=steps, guidance_scale=config.guidance,
                               seed=config.seed, sampler=config.sampler, best_of=config.best_of),
                config.batch_sizes, config.speed_repeats, device, pipe.dtype, label=f"{name}: speed")

        sweeps = {}
        for key, sweep_values in config.sweeps.items():
            points = []
            for value in sweep_values:
                setting = {"steps": steps, "guidance": config.guidance, "sampler": config.sampler, key: value}
                sweep_images, sweep_seconds = run_setting(setting["steps"], setting["guidance"], setting["sampler"])
                point_metrics, _, _ = (values, None, None) if sweep_images is images else quality_metrics(sweep_images, ref)
                points.append({"value": value, "metrics": {**point_metrics, "seconds_per_image": sweep_seconds}})
            sweeps[key] = points
        creative = {"trained_on": facts[index].get("data"), "hold_out": hold_outs[index] and hold_outs[index].texts}
        if search is not None:
            creative.update(_copies(search, images, image_prompts, embedder, out / f"closest_{index}.png"))
        if hold_outs[index] is not None and tasks is not None:
            own = [p for p in extra_prompts if hold_outs[index].covers(p)]
            extra_images, _ = generate_images(pipe, own, config.per_prompt, steps, config.guidance,
                                              config.sampler, config.seed + len(image_prompts), f"{name}: held out",
                                              layout, config.best_of)
            own_prompts = [p for p in own for _ in range(config.per_prompt)]
            extra_passed = [check(image, prompt).ok for image, prompt in zip(extra_images, own_prompts)]
            creative["compositions"] = creativity.compositions(
                hold_outs[index], image_prompts + own_prompts, creativity.grammar_tasks(image_prompts + own_prompts),
                passed + extra_passed)
        probe = None
        if config.data == "shapes" and config.relation_probe:
            if pipe.few_step:   # a GAN has no UNet; a distilled UNet takes the guidance scale as input
                _warn(notes, f"the relation probe asks a diffusion model's UNet (without guidance input): {name} "
                             "is not probed.")
            else:
                probe = relation_probe.probe_unet(pipe.model, config.relation_probe, seed=config.seed)
        results.append({"name": name, "path": str(path), "model_hash": pipe.model_hash, "steps": steps, "layout": layout,
                        "metrics": values, "faithfulness": faithfulness, "speed": speed_result, "sweeps": sweeps,
                        "creativity": creative, "relation_probe": probe})
        del pipe, cache

    figures: dict = {"grids": grids}
    if tasks is not None:
        figures["faithfulness"] = "faithfulness.png"
        report.faithfulness_chart({r["name"]: r["faithfulness"] for r in results}, out / figures["faithfulness"])
    if config.sweeps:
        figures["sweeps"] = {}
        for key in config.sweeps:
            figures["sweeps"][key] = f"sweep_{key}.png"
            report.sweep_chart(key, {r["name"]: r["sweeps"][key] for r in results}, out / figures["sweeps"][key])

    if search is not None:
        figures["copy_distances"] = "copy_distances.png"
        series = {"training set (against the rest)": search.calibration.train.relative}
        if search.fresh is not None:
            series["fresh shapes scenes"] = search.fresh["relative"]
        series.update({r["name"]: r["creativity"]["copies"]["relative"] for r in results})
        report.distance_chart(series, memorisation.COPY_RATIO, out / figures["copy_distances"])

    settings = asdict(config)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()}
    settings["models"] = [str(p) for p in config.models]
    settings["batch_sizes"] = list(config.batch_sizes)
    settings["n_prompts"] = len(prompts)
    settings["device"] = device
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "feature_extractor": extractor.name,
        "feature_dim": extractor.dim,
        "text_model": embedder.name,
        "resize_convention": RESIZE_CONVENTION,
        "prompts": prompts,
        "seeds": f"image j of prompt i uses seed {config.seed} + i*{config.per_prompt} + j"
                 + (f"; its other {config.best_of - 1} candidates, seeds drawn from that one"
                    if config.best_of > 1 else ""),
        "warnings": notes,
        "models": results,
        "figures": figures,
        "memorisation": search and search.to_json(),
        "held_out_prompts": extra_prompts,
    }
    report.write_report(result, out)
    return result
