"""`brushwork eval`: realism, text agreement, diversity, faithfulness, speed and memory in one report."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from brushwork.errors import BrushworkError


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise BrushworkError(f"--batch-sizes {text!r}: expected whole numbers separated by commas, e.g. 1,4,16") from None
    if any(not 1 <= b <= 64 for b in sizes):
        raise BrushworkError(f"--batch-sizes {text!r}: each batch size must be between 1 and 64")
    return sizes


def evaluate(
    model: Annotated[list[Path], typer.Option("--model", help="Model folder or shipped model name (shapes, shapes-gan, emoji); repeat to compare several side by side.")],
    data: Annotated[str, typer.Option(help="shapes, emoji, or a folder of your own images with captions.")] = "shapes",
    n: Annotated[int, typer.Option(help="Prompts per task (shapes) or prompts drawn from the data set.")] = 64,
    per_prompt: Annotated[int, typer.Option(help="Images per prompt (2+ for intra-prompt diversity).")] = 2,
    out: Annotated[Path, typer.Option(help="Folder for report.html, report.json, grids and plots.")] = Path("eval"),
    steps: Annotated[int | None, typer.Option(help="Sampling steps [default: each model's own: 20, 4 for a few-step model].")] = None,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 5.0,
    sampler: Annotated[str | None, typer.Option(help="Sampler name (default: the pipeline's).")] = None,
    seed: Annotated[int, typer.Option(help="Base seed: image j of prompt i uses seed + i*per_prompt + j.")] = 0,
    inception_weights: Annotated[Path | None, typer.Option(
        help="FID Inception-v3 weights file (pt_inception-2015-12-05); default features: the model's CLIP.")] = None,
    clip: Annotated[Path | None, typer.Option(help="A CLIP model folder (or a model holding clip/) for all text/image "
                                                   "embeddings (default: the clip/ of the first model that has one).")] = None,
    sweep: Annotated[list[str] | None, typer.Option(
        help="KEY=V1,V2,... with KEY steps, guidance or sampler; repeatable. Plots each metric against it.")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes for the throughput measurement; '' skips speed.")] = "1,4,16",
    speed_repeats: Annotated[int, typer.Option(help="Timed calls per batch size (median kept).")] = 3,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, mps (default: the best available).")] = None,
    layout: Annotated[bool, typer.Option("--layout", help="Sample with layout guidance (diffusion models): position "
                                                         "prompts draw each object where the relation puts it, "
                                                         "counting prompts each copy apart.")] = False,
    best_of: Annotated[int, typer.Option("--best-of", help="Make each image this many times and keep the one the "
                                                           "model's CLIP finds closest to its prompt.")] = 1,
    train_images: Annotated[int | None, typer.Option(
        "--train-images", help="Training images of --data searched for near-copies (default: all; for shapes the "
                               "draw the model trained on; 0 skips the search).")] = None,
    ray: Annotated[str | None, typer.Option("--ray", help="Generate the images on Ray (local, auto or HOST:PORT), into "
                                                         "OUT/images/ with a manifest; a rerun makes only what is "
                                                         "missing. Needs brushwork[ray].", show_default=False)] = None,
    actors: Annotated[int | None, typer.Option(help="--ray: actors generating at once [default: one per CPU].")] = None,
    relation_probe: Annotated[int, typer.Option(
        "--relation-probe", help="Held-out position scenes for the UNet relation probe (shapes, diffusion models): "
                                 "does the UNet denoise with the own caption better than with a near miss? 0 skips.")] = 200,
) -> None:
    """Evaluate one or more models on the same prompts and seeds and write a report."""
    from brushwork.eval.run import EvalConfig, evaluate as run_evaluation, parse_sweep

    sweeps = dict(parse_sweep(s) for s in sweep or [])
    config = EvalConfig(models=model, out=out, data=data, n=n, per_prompt=per_prompt, steps=steps, guidance=guidance,
                        sampler=sampler, seed=seed, inception_weights=inception_weights, clip=clip, sweeps=sweeps,
                        batch_sizes=_batch_sizes(batch_sizes), speed_repeats=speed_repeats, device=device,
                        layout=layout, best_of=best_of, train_images=train_images, ray=ray is not None, actors=actors,
                        relation_probe=relation_probe)
    if ray is None:
        result = run_evaluation(config)
    else:
        from brushwork.bulk.ray_run import check_address, import_ray, ray_session

        import_ray()
        check_address(ray)
        with ray_session(ray):
            result = run_evaluation(config)
    console = Console()
    for entry in result["models"]:
        values = entry["metrics"]
        line = f"{entry['name']}: FID {values['fid']:.2f}, KID {values['kid_mean']:.4f}, CLIP score {values['clip_score']:.2f}"
        if values.get("faithfulness"):
            line += f", faithfulness {values['faithfulness']['accuracy']:.3f}"
        if entry.get("relation_probe"):
            weakest = entry["relation_probe"]["weakest_relation"]
            line += ", relation probe " + " / ".join(f"{share:.2f}" for share in weakest.values()) + \
                f" (t = {' / '.join(weakest)})"
        if entry["creativity"].get("copies"):
            line += f", copy rate {entry['creativity']['copies']['copy_rate']:.3f}"
        console.print(line, highlight=False)
    console.print(f"Report: {out / 'report.html'}", highlight=False)
