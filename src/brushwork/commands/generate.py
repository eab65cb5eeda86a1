"""`brushwork generate` and `brushwork info`."""

import dataclasses
import json
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from brushwork.errors import BrushworkError

if TYPE_CHECKING:
    from brushwork.bulk.jobs import Defaults
    from brushwork.bulk.ray_run import Settings

PRECISIONS = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _free(path: Path, taken: set[Path]) -> bool:
    return not path.exists() and path not in taken


def output_paths(output: Path | None, count: int) -> list[Path]:
    """Where `count` images go; existing files are never overwritten (a counter is added instead).

    None or a folder (existing, or written with a trailing slash) -> numbered files 00000.png, ...
    x.png -> x.png for one image, x-0.png, x-1.png, ... for several.
    """
    output = Path(".") if output is None else output
    is_folder = output.is_dir() or str(output).endswith(("/", "\\")) or not output.suffix
    if not is_folder and output.suffix.lower() != ".png":
        raise BrushworkError(f"-o {output}: brushwork writes PNG files; use a .png name or a folder")
    paths: list[Path] = []
    taken: set[Path] = set()
    if is_folder:
        output.mkdir(parents=True, exist_ok=True)
        candidates = (output / f"{i:05d}.png" for i in range(10**6))
    else:
        if not output.parent.is_dir():
            raise BrushworkError(f"output folder does not exist: {output.parent}")
        if count == 1 and not output.exists():
            return [output]
        start = 0 if count > 1 else 1
        candidates = (output.with_name(f"{output.stem}-{i}.png") for i in range(start, 10**6))
    for candidate in candidates:
        if _free(candidate, taken):
            paths.append(candidate)
            taken.add(candidate)
            if len(paths) == count:
                return paths
    raise BrushworkError(f"no free file names left at {output}")


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise BrushworkError(f"prompts file not found: {path}")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise BrushworkError(f"{path} is not UTF-8 text") from None
    if not prompts:
        raise BrushworkError(f"{path} holds no prompts (one prompt per line expected)")
    return prompts


def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="What to draw.", show_default=False)] = None,
    num_images: Annotated[Optional[int], typer.Option("-n", "--num-images", help="Images per prompt.", show_default="1")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the first image (image k uses seed + k); -1 or none: random (the PNG records the seed used).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps.", show_default="20; 4 for a few-step model")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale; <= 1 turns it off.", show_default="5")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="dpm++, ddim, euler, euler_a, heun, lcm (few-step models) or AUTOMATIC1111 names.", show_default="dpm++; lcm for a few-step model")] = None,
    negative: Annotated[Optional[str], typer.Option(help="Negative prompt.")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Model folder, SD .safetensors file or shipped model name (shapes, shapes-gan, emoji).", show_default="shapes")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N or mps.", show_default="best available")] = None,
    height: Annotated[Optional[int], typer.Option(help="Image height in pixels.", show_default="the model's size")] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width in pixels.", show_default="the model's size")] = None,
    precision: Annotated[str, typer.Option(help="auto, fp32 (matches diffusers exactly), bf16 or fp16.")] = "auto",
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow .ckpt/.pt pickle model files (weights only).")] = False,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="x.png, or a folder for numbered files.", show_default="current folder")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option("--prompts", help="Text file with one prompt per line.")] = None,
    from_image: Annotated[Optional[Path], typer.Option("--from", help="Regenerate from the parameters stored in this PNG, with the shipped model it names unless --model is given.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images sampled together.")] = 4,
    no_watermark: Annotated[bool, typer.Option("--no-watermark", help="Do not put the invisible watermark in the images.")] = False,
    layout: Annotated[bool, typer.Option("--layout", help="Layout guidance: prompts 'A left of / right of / above / below B' draw A and B where the relation puts them, and 'two/three/four Xs' draw each copy apart (diffusion models).")] = False,
    best_of: Annotated[int, typer.Option("--best-of", help="Make each image this many times and keep the one the model's CLIP finds closest to the prompt (that many times the work). The PNG records the kept image's seed, so --from remakes it without reranking.")] = 1,
    compile: Annotated[bool, typer.Option("--compile", help="Compile the UNet and VAE decoder: about 2.5-3x faster sampling than eager on a CPU with bf16. The first use of a model at a batch size compiles for 2-3 minutes and is cached; later runs load it in a second.")] = False,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Generate --prompts FILE (.txt, .jsonl or .parquet) on Ray into the folder -o DIR, with a Parquet manifest; a rerun makes only what is missing. local (a cluster on this machine), auto (the one `ray start` runs here) or HOST:PORT. Needs brushwork[ray].", show_default=False)] = None,
    actors: Annotated[Optional[int], typer.Option(help="--ray: actors generating at once [default: as many as the cluster's CPUs (or GPUs) allow].")] = None,
    num_cpus: Annotated[float, typer.Option(help="--ray: CPUs per actor (also its torch threads).")] = 1,
    num_gpus: Annotated[float, typer.Option(help="--ray: GPUs per actor; above 0 the actors generate on CUDA.")] = 0,
    bad_rows: Annotated[str, typer.Option(help="--ray: on rows that cannot be read, stop before starting, or skip them (recorded in the manifest).")] = "stop",
) -> None:
    """Generate images from a prompt; each PNG stores its parameters (see `brushwork info`)."""
    import torch

    from brushwork.generation.auto import BrushworkPipeline
    from brushwork.generation.output import GenerationCancelled
    from brushwork.generation.registry import shipped_models
    from brushwork.generation.samplers import GAN_SAMPLER, resolve_sampler
    from brushwork.pnginfo import read_parameters, save_png
    from brushwork.watermark import embed

    if ray is not None:
        from brushwork.bulk.jobs import Defaults
        from brushwork.bulk.ray_run import Settings

        if prompts_file is None or prompt is not None or from_image is not None:
            raise BrushworkError("--ray generates from --prompts FILE only (no prompt argument, no --from)")
        defaults = Defaults(seed=seed or 0, negative=negative or "", steps=steps,
                            guidance=5.0 if guidance is None else guidance, model=_model_name(model))
        settings = Settings(out=str(output), model=defaults.model, device=device or ("cuda" if num_gpus > 0 else "cpu"),
                            precision=precision, allow_pickle=allow_pickle, compile=compile, batch_size=batch_size,
                            sampler=sampler, height=height, width=width, layout=layout, best_of=best_of,
                            watermark=not no_watermark)
        per_row = 1 if num_images is None else num_images
        return _generate_on_ray(ray, prompts_file, output, per_row, defaults, settings, actors, num_cpus, num_gpus,
                                bad_rows)
    if prompts_file is not None and prompts_file.suffix.lower() in (".jsonl", ".parquet"):
        raise BrushworkError(f"{prompts_file.name}: .jsonl and .parquet prompt files (with per-row seed, negative, "
                             "steps, guidance and model) are read by --ray; use --ray local to run on this machine")
    console = Console(stderr=True)
    stored: dict = {}
    if from_image is not None:
        stored = read_parameters(from_image)
        if model is None and stored.get("model") in shipped_models():  # the shipped model that made it
            model = Path(stored["model"])
        if stored.get("sampler") == GAN_SAMPLER:  # a GAN's PNG: its model takes no sampler
            del stored["sampler"]
        schedule = stored.get("schedule_type", "Automatic")
        if schedule.lower() != "automatic":
            console.print(f"Warning: {from_image} was sampled with Schedule type {schedule}, which brushwork "
                          "ignores: it samples on the model's own noise schedule (Automatic), so the image will "
                          "differ.")
    sources = [prompt is not None, prompts_file is not None, from_image is not None]
    if sum(sources) == 0:
        raise BrushworkError("give a prompt, --prompts FILE, or --from IMAGE.png")
    if prompt is not None and prompts_file is not None:
        raise BrushworkError("give either a prompt or --prompts FILE, not both")
    prompts = _read_prompts(prompts_file) if prompts_file is not None else [
        prompt if prompt is not None else stored.get("prompt", "")]
    if precision not in PRECISIONS:
        raise BrushworkError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    if batch_size <= 0:
        raise BrushworkError(f"--batch-size must be positive, got {batch_size}")

    def pick(value, key, default):
        return value if value is not None else stored.get(key, default)

    num_images = pick(num_images, "num_images", 1)
    steps = pick(steps, "steps", None)  # None: the pipeline's default (a GAN takes none)
    guidance = pick(guidance, "cfg_scale", 5.0)
    sampler = pick(sampler, "sampler", None)
    sampler = None if sampler is None else resolve_sampler(sampler)  # None: the model's (lcm for a few-step one)
    negative = pick(negative, "negative_prompt", "")
    height, width = pick(height, "height", None), pick(width, "width", None)
    seed = pick(seed, "seed", None)
    if seed is not None and seed < -1:
        raise BrushworkError(f"--seed must be -1 (random) or at least 0, got {seed}")
    seed = random.randrange(2**32) if seed in (None, -1) else seed
    layout = layout or stored.get("layout") == "on"
    if num_images <= 0:
        raise BrushworkError(f"-n must be at least 1, got {num_images}")

    from brushwork.generation.loading import quiet_libraries

    quiet_libraries()
    dtype = getattr(torch, PRECISIONS[precision]) if PRECISIONS[precision] else None
    pipe = BrushworkPipeline.from_pretrained(model, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                             compile=compile)
    if stored.get("model_hash") and stored["model_hash"] != pipe.model_hash:
        console.print(f"Warning: {from_image} was made with model {stored.get('model', '?')} "
                      f"(hash {stored['model_hash']}); this is {pipe.name} (hash {pipe.model_hash}), "
                      "so the image will differ.")

    jobs = [p for p in prompts for _ in range(num_images)]
    paths = output_paths(output, len(jobs))
    written: list[Path] = []
    progress = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True)
    with progress, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_image = pipe.resolve_steps(steps) * best_of
        task = progress.add_task("generate", total=len(jobs) * per_image)
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            # Compiled code fits one batch size: a short last batch takes copies (dropped after) rather than
            # minutes of compiling for its size.
            padded = batch + batch[-1:] * (batch_size - len(batch)) if compile and start > 0 else batch

            def advance(_pipe, _step, _timestep, _kwargs):
                progress.advance(task, len(batch))

            try:
                result = pipe(padded, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                              seed=seed + start, height=height, width=width, sampler=sampler,
                              callback_on_step_end=advance, layout=layout, best_of=best_of)
            except GenerationCancelled:
                break
            # step callbacks moved the bar (a one-step GAN makes none); the batch is done either way
            progress.update(task, completed=(start + len(batch)) * per_image)
            for k, image in enumerate(result.images[:len(batch)]):
                image = image if no_watermark else embed(image)
                written.append(save_png(image, paths[start + k], result.parameters(k)))
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
        console.print(f"Warning: {message}")
    for path in written:
        typer.echo(str(path))


def _model_name(model: Path | None) -> str | None:
    """A model folder as an absolute path (the actors' working folder is not this one); a name as it is."""
    return None if model is None else str(model.resolve()) if model.expanduser().exists() else str(model)


def _generate_on_ray(address: str, prompts_file: Path, output: Path | None, per_row: int, defaults: "Defaults",
                     settings: "Settings", actors: int | None, num_cpus: float, num_gpus: float, bad_rows: str) -> None:
    """`generate --prompts FILE -o DIR --ray ADDRESS`: the same images as without --ray (at the same batch size),
    one per job, named by its index, recorded in DIR/manifest/."""
    from brushwork.bulk.jobs import bad_row_records, plan_jobs, write_manifest_part
    from brushwork.bulk.ray_run import check_address, generate_on_ray, import_ray, ray_session
    from brushwork.generation.samplers import resolve_sampler

    import_ray()
    check_address(address)
    if output is None or output.suffix.lower() == ".png":
        raise BrushworkError("--ray writes into a folder: give -o DIR")
    if bad_rows not in ("stop", "skip"):
        raise BrushworkError(f"--bad-rows must be stop or skip, got {bad_rows!r}")
    for name, value in (("--batch-size", settings.batch_size), ("-n", per_row), ("--num-cpus", num_cpus),
                        ("--actors", actors or 1)):
        if value <= 0:
            raise BrushworkError(f"{name} must be positive, got {value}")
    if num_gpus < 0:
        raise BrushworkError(f"--num-gpus must be at least 0, got {num_gpus}")
    if settings.precision not in PRECISIONS:
        raise BrushworkError(f"unknown precision '{settings.precision}'; use one of {', '.join(PRECISIONS)}")
    jobs, bad, unknown = plan_jobs(prompts_file, defaults, per_row)
    console = Console(stderr=True)
    if unknown:
        console.print(f"Warning: {prompts_file.name}: columns {', '.join(unknown)} are not read (brushwork reads "
                      "prompt, seed, negative, steps, guidance, model)", highlight=False)
    if bad:
        listed = "; ".join(f"row {row}: {reason}" for row, reason in bad[:5]) + ("; ..." if len(bad) > 5 else "")
        if bad_rows == "stop":
            raise BrushworkError(f"{prompts_file.name} has {len(bad)} bad row(s), nothing generated: {listed}. Fix "
                                 "them, or pass --bad-rows skip to make the others and record these in the manifest")
        console.print(f"Warning: skipping {len(bad)} bad row(s) of {prompts_file.name}: {listed}", highlight=False)
    output.mkdir(parents=True, exist_ok=True)
    write_manifest_part(output, bad_row_records(bad), "bad-rows")
    settings = dataclasses.replace(settings, out=str(output.resolve()), precision=PRECISIONS[settings.precision],
                                   sampler=resolve_sampler(settings.sampler or "dpm++"))
    with ray_session(address) as ray_module:
        generate_on_ray(ray_module, jobs, settings, actors, num_cpus, num_gpus, console)
    typer.echo(str(output / "manifest"))


def info(
    image: Annotated[Path, typer.Argument(help="A PNG written by brushwork (or AUTOMATIC1111).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the parsed parameters as JSON.")] = False,
) -> None:
    """Print the generation parameters stored in a PNG."""
    from brushwork.pnginfo import parse_parameters, read_parameters_text

    text = read_parameters_text(image)
    typer.echo(json.dumps(parse_parameters(text), indent=2, ensure_ascii=False) if as_json else text)
