"""Images/s of `brushwork generate --ray` on a local Ray cluster: 1 and 2 actors (1 CPU each), batch 1 and 8.

Each run makes the same images (the shipped model, 20 steps, guidance 5) into a fresh folder. "end to end" counts
from the first job handed out to the last image recorded, actor start and model load included; "per actor" is
the actors' own generation time (the manifest's seconds per image), what each added actor (or node, times its
actors) should add once a run is long enough for the start to vanish. In-process generation on the same number
of threads is the baseline.

    python benchmarks/bench_ray.py [--model shapes] [--images 24] [--steps 20] [--cpus 2] [--batches 1,8]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow.compute as pc
import ray
import torch

from brushwork.bulk.jobs import Job, read_manifest
from brushwork.bulk.ray_run import Settings, generate_on_ray
from brushwork.generation.auto import BrushworkPipeline
from brushwork.generation.registry import resolve_model

PROMPTS = ["a red circle above a blue square", "three green triangles", "a small purple square",
           "a yellow circle and a blue triangle"]


def in_process(model: Path, jobs: list[Job], batch: int, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    pipe = BrushworkPipeline.from_pretrained(model, device="cpu")
    pipe(PROMPTS[0], num_inference_steps=steps, seed=0)   # warm-up
    started = time.perf_counter()
    for first in range(0, len(jobs), batch):
        group = jobs[first:first + batch]
        pipe([j.prompt for j in group], num_inference_steps=steps, seed=[j.seed for j in group])
    return len(jobs) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    args = parser.parse_args()
    model = resolve_model(args.model)
    jobs = [Job(index=k, row=k + 1, prompt=PROMPTS[k % len(PROMPTS)], seed=k, steps=args.steps)
            for k in range(args.images)]
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    print(f"{args.images} images, {args.steps} steps, model {args.model}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| actors | batch | end to end images/s | per actor images/s | in-process images/s (threads = actors) |")
    print("| --- | --- | --- | --- | --- |")
    for batch in [int(b) for b in args.batches.split(",")]:
        for actors in (1, 2):
            with tempfile.TemporaryDirectory() as folder:
                settings = Settings(out=folder, model=str(model), batch_size=batch)
                made, seconds = generate_on_ray(ray, jobs, settings, actors=actors)
                manifest = read_manifest(Path(folder))
                per_actor = 1 / pc.mean(manifest.column("seconds")).as_py()
            baseline = in_process(model, jobs, batch, actors, args.steps)
            print(f"| {actors} | {batch} | {made / seconds:.2f} | {per_actor:.2f} | {baseline:.2f} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
