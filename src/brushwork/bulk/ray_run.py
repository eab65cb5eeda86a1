"""Bulk generation on a Ray cluster: Ray Data hands groups of jobs to a pool of actors, each of which loads the
pipeline once and writes PNGs (A1111 parameters, watermark) and a manifest file per group.

The driver reads and checks the prompt file (brushwork.bulk.jobs), leaves out the jobs the manifest already
holds, and shows progress in images/s. An actor never raises: a model it cannot load, a failed write (a full
disk) or a failed generation comes back as a record with an error, and the driver stops the run with it once,
so no actor restarts in a loop. A group's manifest file is written after its images, and only whole, so a
killed worker or driver loses no recorded image, and a rerun makes the missing groups again, pixel for pixel.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from brushwork.bulk.jobs import MANIFEST_SCHEMA, Job, groups_of, job_record, read_manifest, write_manifest_part
from brushwork.errors import BrushworkError

INSTALL_HINT = "pip install 'brushwork[ray]' (or pip install 'ray[data]')"
CONNECT_TIMEOUT_S = 10


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BrushworkError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def check_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a cluster address; None for local and auto."""
    if address in ("local", "auto"):
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise BrushworkError(f"--ray {address!r}: use local, auto, or a cluster address HOST:PORT "
                             "(e.g. 10.0.0.5:6379, or ray://10.0.0.5:10001 for Ray Client)")
    return host, int(port)


def _check_reachable(address: str) -> None:
    """Fail within CONNECT_TIMEOUT_S when nothing answers at HOST:PORT (ray.init alone may wait a minute)."""
    host, port = check_address(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise BrushworkError(f"cannot reach a Ray cluster at {address}: {e.strerror or e}. Is `ray start --head` "
                             "running there, and is the port open?") from None


@contextmanager
def ray_session(address: str):
    """Ray, connected: an existing connection (e.g. a test's ray.init) is used as it is; otherwise `local` starts
    a cluster on this machine, `auto` joins the one `ray start` runs here, HOST:PORT joins that one."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    options = dict(logging_level=logging.WARNING, log_to_driver=False)
    if address == "local":
        options["include_dashboard"] = False
    elif address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as e:
        hint = " (start one with `ray start --head`, or use --ray local)" if address == "auto" else ""
        raise BrushworkError(f"cannot connect to Ray at {address!r}: {str(e).splitlines()[0]}{hint}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass
class Settings:
    """What every actor needs: the output folder and the call's settings that no row overrides."""
    out: str
    model: str | None = None
    device: str = "cpu"
    precision: str | None = None          # torch dtype name, None: the device's default
    allow_pickle: bool = False
    compile: bool = False
    batch_size: int = 4
    sampler: str | None = None
    height: int | None = None
    width: int | None = None
    layout: bool = False
    best_of: int = 1
    watermark: bool = True
    threads: int = 1


class _Fatal(Exception):
    """Stops the run: the reason goes back to the driver as a record."""


def _save_whole(image, path: Path, parameters: dict) -> None:
    from brushwork.pnginfo import save_png

    temporary = path.with_name(f".{path.name}.tmp")
    try:
        save_png(image, temporary, parameters)
        os.replace(temporary, path)
    except OSError as e:
        raise _Fatal(f"could not write {path}: {e}") from None
    finally:
        temporary.unlink(missing_ok=True)


class GroupWriter:
    """Ray Data's callable class: one per actor, the pipeline loaded once (per model named by the rows)."""

    def __init__(self, settings: dict):
        import torch

        from brushwork.generation.loading import quiet_libraries

        torch.set_num_threads(settings["threads"])
        quiet_libraries()
        self.settings = Settings(**settings)
        self.pipes: dict = {}
        self.failures: dict[str | None, str] = {}
        self._pipe(self.settings.model)   # the run's own model, before the first batch

    def _pipe(self, model: str | None):
        if model not in self.pipes and model not in self.failures:
            import torch

            from brushwork.generation.auto import BrushworkPipeline

            s = self.settings
            try:
                self.pipes[model] = BrushworkPipeline.from_pretrained(
                    model, device=s.device, dtype=getattr(torch, s.precision) if s.precision else None,
                    allow_pickle=s.allow_pickle, compile=s.compile)
            except Exception as e:  # noqa: BLE001 -- any reason goes back to the driver, once
                self.failures[model] = f"cannot load model {model or 'shapes'}: {e}"
        if model in self.failures:
            raise _Fatal(self.failures[model])
        return self.pipes[model]

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = []
        for text in batch.column("jobs").to_pylist():
            jobs = [Job(**values) for values in json.loads(text)]
            try:
                records += self.run_group(jobs)
            except _Fatal as e:
                records.append({"index": jobs[0].index, "row": jobs[0].row, "error": str(e)})
                break
        return pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA)

    def run_group(self, jobs: list[Job]) -> list[dict]:
        """Make, write and record one group; its manifest file is written last, so it names only whole PNGs."""
        from brushwork.watermark import embed

        s = self.settings
        out = Path(s.out)
        calls: dict[tuple, list[Job]] = {}
        for job in jobs:
            calls.setdefault(job.call_key(), []).append(job)
        records = []
        for (model, steps, guidance), part in calls.items():
            pipe = self._pipe(model)
            # Compiled code fits one batch size: a short later group takes copies, as `brushwork generate` does.
            padded = part + part[-1:] * (s.batch_size - len(part)) if s.compile and part[0].index >= s.batch_size \
                else part
            started = time.perf_counter()
            try:
                result = pipe([j.prompt for j in padded], negative_prompt=[j.negative for j in padded],
                              num_inference_steps=steps, guidance_scale=guidance, seed=[j.seed for j in padded],
                              height=s.height, width=s.width, sampler=s.sampler, layout=s.layout, best_of=s.best_of)
            except Exception as e:  # noqa: BLE001
                raise _Fatal(f"generation failed at row {part[0].row}: {e}") from None
            seconds = (time.perf_counter() - started) / len(padded)
            finished = datetime.now(timezone.utc)
            for k, job in enumerate(part):
                image = embed(result.images[k]) if s.watermark else result.images[k]
                path = out / f"{job.index:05d}.png"
                _save_whole(image, path, result.parameters(k))
                records.append(job_record(job) | {"steps": pipe.resolve_steps(steps), "file": path.name,
                                                  "model_hash": pipe.model_hash, "time": finished,
                                                  "seconds": seconds})
        try:
            write_manifest_part(out, records, f"group-{jobs[0].index:09d}")
        except OSError as e:
            raise _Fatal(f"could not write the manifest in {out}: {e}") from None
        return records


def done_indices(out: Path, jobs: list[Job]) -> set[int]:
    """The jobs the manifest records as made. A record that another job had at that index (another prompt file,
    seed or setting written into the same folder) stops the run rather than be mixed with this one."""
    table = read_manifest(out)
    made = {r["index"]: r for r in table.filter(pc.is_null(table.column("error"))).to_pylist()}
    for job in jobs:
        record = made.get(job.index)
        if record is None:
            continue
        wanted = {k: v for k, v in job_record(job).items() if k != "steps" or v is not None}
        changed = [k for k, v in wanted.items() if record[k] != v]
        if changed:
            raise BrushworkError(f"{out} holds image {record['file']} of another run ({', '.join(changed)} differ "
                                 f"from row {job.row}: {record[changed[0]]!r} there, {wanted[changed[0]]!r} now). "
                                 "Write into a new folder, or rerun with the same file and flags to finish that run.")
    return set(made)


def generate_on_ray(ray, jobs: list[Job], settings: Settings, actors: int | None = None, num_cpus: float = 1,
                    num_gpus: float = 0, console: Console | None = None) -> tuple[int, float]:
    """Make the jobs the manifest in settings.out does not hold yet. Returns (images made, seconds)."""
    out = Path(settings.out)
    done = done_indices(out, jobs)
    todo = [job for job in jobs if job.index not in done]
    groups = groups_of(todo, settings.batch_size)
    console = console or Console(stderr=True)
    if done:
        console.print(f"{len(jobs) - len(todo)} of {len(jobs)} images are in the manifest already; making the "
                      f"other {len(todo)}.", highlight=False)
    if not groups:
        return 0, 0.0
    if actors is None:
        resources = ray.cluster_resources()
        per_actor = resources.get("GPU", 0) / num_gpus if num_gpus else resources.get("CPU", 1) / num_cpus
        actors = max(1, int(per_actor))
    actors = min(actors, len(groups))

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    settings = Settings(**asdict(settings) | {"threads": max(1, int(num_cpus))})
    items = [{"jobs": json.dumps([asdict(job) for job in group])} for group in groups]
    dataset = ray.data.from_items(items, override_num_blocks=min(len(items), 1000)).map_batches(
        GroupWriter, fn_constructor_kwargs={"settings": asdict(settings)}, batch_size=1, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=num_cpus, num_gpus=num_gpus or None)

    made, started = 0, time.perf_counter()
    progress = Progress(TextColumn(f"generating on {actors} Ray actor{'s' * (actors > 1)}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                        console=console, transient=True)
    with progress:
        task = progress.add_task("ray", total=len(todo), rate="")
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            errors = [e for e in batch.column("error").to_pylist() if e]
            if errors:
                raise BrushworkError(f"{errors[0]} (images made so far are kept in {out}/manifest; rerun to "
                                     "go on once fixed)")
            made += batch.num_rows
            rate = made / (time.perf_counter() - started)
            progress.update(task, completed=made, rate=f"{rate:.2f} images/s")
    seconds = time.perf_counter() - started
    console.print(f"{made} images in {seconds:.1f} s: {made / seconds:.2f} images/s on {actors} actor(s)",
                  highlight=False)
    return made, seconds
