"""The evaluation report: image grids, charts (matplotlib, Agg) and one self-contained HTML page plus JSON."""

import base64
import html
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

# (key in a model's metrics, label, format); the order of the table's rows.
METRIC_ROWS = [
    ("fid", "FID ↓", "{:.2f}"),
    ("kid_mean", "KID ↓ (mean)", "{:.4f}"),
    ("kid_std", "KID (std over subsets)", "{:.4f}"),
    ("clip_score", "CLIP score ↑", "{:.2f}"),
    ("retrieval_top1", "retrieval top-1 ↑", "{:.3f}"),
    ("retrieval_top5", "retrieval top-5 ↑", "{:.3f}"),
    ("precision", "precision ↑", "{:.3f}"),
    ("recall", "recall ↑", "{:.3f}"),
    ("density", "density ↑", "{:.3f}"),
    ("coverage", "coverage ↑", "{:.3f}"),
    ("intra_prompt_diversity", "intra-prompt diversity", "{:.3f}"),
    ("faithfulness", "faithfulness (overall) ↑", "{:.3f}"),
    ("seconds_per_image", "seconds per image (generation run)", "{:.3f}"),
]
SWEEP_METRICS = ["fid", "kid_mean", "clip_score", "retrieval_top1", "precision", "recall", "coverage",
                 "intra_prompt_diversity", "faithfulness", "seconds_per_image"]
CELL = 128
CAPTION_LINES = 3


def make_grid(images: list[Image.Image], captions: list[str], columns: int = 6) -> Image.Image:
    """Images scaled to CELL px (nearest: small images stay crisp), each with its caption under it."""
    font = ImageFont.load_default(size=11)
    line_height = 13
    rows = (len(images) + columns - 1) // columns
    cell_height = CELL + CAPTION_LINES * line_height + 6
    grid = Image.new("RGB", (columns * (CELL + 4) + 4, rows * cell_height + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x = 4 + (i % columns) * (CELL + 4)
        y = 4 + (i // columns) * cell_height
        grid.paste(image.convert("RGB").resize((CELL, CELL), Image.NEAREST), (x, y))
        lines = textwrap.wrap(caption, width=22)[:CAPTION_LINES]
        for j, line in enumerate(lines):
            draw.text((x, y + CELL + 2 + j * line_height), line, fill="black", font=font)
    return grid


def faithfulness_chart(models: dict[str, dict], path: Path) -> Path:
    """Grouped bars: accuracy per task (and overall) per model, with 95% Wilson intervals."""
    tasks = list(next(iter(models.values())))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks)), 3.5))
    for m, (name, per_task) in enumerate(models.items()):
        xs = [t + (m - (len(models) - 1) / 2) * width for t in range(len(tasks))]
        values = [per_task[t]["accuracy"] for t in tasks]
        errors = [[v - per_task[t]["low"] for t, v in zip(tasks, values)],
                  [per_task[t]["high"] - v for t, v in zip(tasks, values)]]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.set_title("Prompt faithfulness per task")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep_chart(key: str, points: dict[str, list[dict]], path: Path) -> Path:
    """One panel per metric against the swept setting, one line per model. points[model] = [{value, metrics}]."""
    metrics = [m for m in SWEEP_METRICS if any(p["metrics"].get(m) is not None for ps in points.values() for p in ps)]
    columns = min(4, len(metrics))
    rows = (len(metrics) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for name, model_points in points.items():
            xs = [str(p["value"]) for p in model_points]
            ax.plot(xs, [_scalar(p["metrics"].get(metric)) for p in model_points], marker="o", label=name)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(key, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Sweep over {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def distance_chart(series: dict[str, list[float]], threshold: float, path: Path) -> Path:
    """Histograms of nearest-training-image distances, one per series, with the copy threshold marked."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    top = max(1.0, max(max(values, default=0.0) for values in series.values()))
    bins = [top * i / 40 for i in range(41)]
    for label, values in series.items():
        ax.hist(values, bins=bins, density=True, histtype="step", linewidth=1.5, label=f"{label} (n={len(values)})")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"copy threshold {threshold:.2f}")
    ax.set_xlabel("pixel distance to the nearest training image / mean distance to its neighbourhood")
    ax.set_ylabel("density")
    ax.set_title("Nearest training image")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _scalar(value) -> float:
    """A metric as one number: faithfulness entries carry their interval; plot the accuracy."""
    if value is None:
        return float("nan")
    return value["accuracy"] if isinstance(value, dict) else value


def _image_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _format(value, fmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict):            # faithfulness: accuracy with its interval
        return f"{value['accuracy']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"
    return fmt.format(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _speed_rows(models: list[dict]) -> list[list[str]]:
    speeds = [m.get("speed") for m in models]
    if not any(speeds):
        return []

    def row(label, get):
        return [label] + [get(s) if s else "—" for s in speeds]

    def gib(n):
        return "—" if n is None else f"{n / 2**30:.2f} GiB"

    batch_sizes = list(next(s for s in speeds if s)["throughput"])
    rows = [row("device", lambda s: s["device"]),
            row("latency per image (median, batch 1)", lambda s: f"{s['latency_seconds_per_image']:.3f} s")]
    rows += [row(f"images/s at batch {b}", lambda s, b=b: f"{s['throughput'][b]['images_per_second']:.2f}")
             for b in batch_sizes]
    rows += [row("peak RSS while generating", lambda s: gib(s["peak_rss_bytes"])),
             row("peak GPU memory", lambda s: gib(s["peak_gpu_memory_bytes"])),
             row("GFLOPs per image", lambda s: f"{s['flops_per_image'] / 1e9:.2f}"),
             row("machine peak (matmul)", lambda s: f"{s['machine_peak_flops_per_second'] / 1e9:.1f} GFLOP/s "
                                                    f"({s['peak_dtype']})"),
             row("fraction of peak", lambda s: f"{100 * s['fraction_of_peak']:.1f}%")]
    return rows


def _copy_cell(copies: dict | None) -> str:
    if copies is None:
        return "—"
    return f"{copies['copy_rate']:.3f} [{copies['low']:.3f}, {copies['high']:.3f}] ({copies['copies']}/{copies['n']})"


def _creativity(report: dict, out_dir: Path) -> list[str]:
    """The Creativity section: copy rate, distance histogram, seen against held-out faithfulness, closest pairs."""
    models, search = report["models"], report.get("memorisation")
    compositions = [m["creativity"].get("compositions") for m in models]
    if search is None and not any(compositions):
        return []
    parts = ["<h2>Creativity</h2>"]
    trained = []
    for m in models:
        facts = m["creativity"]
        line = f"{m['name']}: {facts['trained_on'] or 'unknown (no training.json)'}"
        trained.append(line + (f", holding out {', '.join(facts['hold_out'])}" if facts["hold_out"] else ""))
    parts.append(f"<p>Trained on: {html.escape('; '.join(trained))}.</p>")
    if search is not None:
        calibration = search["calibration"]
        parts.append(
            f"<h3>Near-copies of training images</h3><p>Each generated image's {search['candidates']} nearest "
            f"training images among the {search['n_train']:,} of <b>{html.escape(search['data'])}</b> "
            f"({html.escape(search['search'])}, on unit CLIP image embeddings), compared with it in pixels "
            f"({search['pixel_side']}px, RMS). A near-copy is at most {calibration['copy_ratio']:.2f} times as far "
            f"from the pixel-nearest of them as from the {search['candidates']} on average: far closer to one "
            f"training image than to its neighbourhood. The training set's own images, checked the same way "
            f"against the others ({calibration['n']} of them, exact duplicates left out), are the reference: "
            f"{_copy_cell(calibration['train_copies'])}; {calibration['duplicate_share']:.1%} of them have an "
            f"exact duplicate in the data.</p>")
        rows = [[m["name"], _copy_cell(m["creativity"].get("copies"))] for m in models]
        if search.get("fresh_data"):
            rows.append(["fresh shapes scenes (reference, never trained on)", _copy_cell(search["fresh_data"])])
        parts.append(_table(["images", "copy rate [95% CI] (copies/n)"], rows))
        parts.append(_image_tag(out_dir / report["figures"]["copy_distances"], "nearest training image distances"))
    if any(compositions):
        tasks = list(dict.fromkeys(task for c in compositions if c for task in c))
        rows = [[task] + [_format(c[task]["seen"], "") + f" (n={c[task]['seen']['n']}) / "
                          + _format(c[task]["held_out"], "") + f" (n={c[task]['held_out']['n']})"
                          if c and task in c else "—" for c in compositions] for task in tasks]
        parts.append("<h3>Seen against held-out combinations</h3><p>Faithfulness (exact shapes checker, 95% "
                     "intervals) on prompts seen in training / prompts the model's hold-out kept from it.</p>"
                     + _table(["task"] + [m["name"] for m in models], rows))
    for m in models:
        grid = m["creativity"].get("closest_grid")
        if grid:
            parts.append(f"<h3>Closest pairs: {html.escape(m['name'])}</h3><p>Generated image, then the training "
                         "image nearest to it; the nearest first.</p>" + _image_tag(out_dir / grid, "closest pairs"))
    return parts


STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: left; font-size: 14px; }
th { background: #f3f3f3; }
.warn { background: #fff4d6; padding: 0.5em 1em; border-left: 4px solid #e0a000; }
img { max-width: 100%; }
"""


def _relation_probe(models: list[dict], names: list[str]) -> list[str]:
    """The Relation probe section: per near miss, the share of scenes the UNet prefers the own caption for."""
    probed = [m["relation_probe"] for m in models if m.get("relation_probe")]
    if not probed:
        return []
    timesteps = probed[0]["timesteps"]
    kinds = list(probed[0]["shares"][str(timesteps[0])])

    def cell(probe: dict | None, kind: str) -> str:
        return "—" if not probe else " / ".join(f"{probe['shares'][str(t)][kind]:.2f}" for t in timesteps)

    rows = [[kind] + [cell(m.get("relation_probe"), kind) for m in models] for kind in kinds]
    return [f"<h2>Relation probe</h2><p>Held-out position scenes ({probed[0]['images']}) are noised and denoised by "
            "the UNet with their own caption and with a near miss; each cell is the share the own caption denoises "
            f"better, at t = {' / '.join(map(str, timesteps))}. 0.5: the UNet ignores what changed; the colour near "
            "miss is the control.</p>" + _table(["near miss"] + names, rows)]


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """report.json (the numbers) and report.html (one file, images inline: opens offline)."""
    out_dir = Path(out_dir)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2))

    models = report["models"]
    names = [m["name"] for m in models]
    settings = report["settings"]
    parts = [f"<h1>brushwork eval</h1><p>{html.escape(report['created'])}</p>"]
    parts.append("<h2>Settings</h2>" + _table(["setting", "value"], [
        [k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)] for k, v in settings.items()]))
    parts.append(f"<p>Realism and diversity features: <b>{html.escape(report['feature_extractor'])}</b>. "
                 f"Text agreement: <b>{html.escape(report['text_model'])}</b>. Every image (real and generated) "
                 f"is prepared by {html.escape(report['resize_convention'])}. Numbers from different feature "
                 "extractors do not compare.</p>")
    if report["warnings"]:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"])
        parts.append(f'<div class="warn"><b>Warnings</b><ul>{items}</ul></div>')

    rows = [[label] + [_format(m["metrics"].get(key), fmt) for m in models]
            for key, label, fmt in METRIC_ROWS if any(m["metrics"].get(key) is not None for m in models)]
    parts.append("<h2>Metrics</h2>" + _table(["metric"] + names, rows))

    figures = report["figures"]
    if "faithfulness" in figures:
        tasks = list(models[0]["faithfulness"])
        rows = [[task] + [_format(m["faithfulness"][task], "") + f" (n={m['faithfulness'][task]['n']})"
                          for m in models] for task in tasks]
        parts.append("<h2>Prompt faithfulness</h2>" + _table(["task"] + names, rows))
        parts.append(_image_tag(out_dir / figures["faithfulness"], "faithfulness per task"))
    parts += _relation_probe(models, names)
    speed_rows = _speed_rows(models)
    if speed_rows:
        parts.append("<h2>Speed and memory</h2>" + _table(["measure"] + names, speed_rows))
    for key, path in figures.get("sweeps", {}).items():
        parts.append(f"<h2>Sweep: {html.escape(key)}</h2>" + _image_tag(out_dir / path, f"sweep over {key}"))
    parts += _creativity(report, out_dir)
    parts.append("<h2>Samples</h2><p>Same prompts and seeds for every model.</p>")
    for name, path in zip(names, figures["grids"]):
        parts.append(f"<h3>{html.escape(name)}</h3>" + _image_tag(out_dir / path, f"samples from {name}"))

    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>brushwork eval</title>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    html_path = out_dir / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return json_path, html_path
