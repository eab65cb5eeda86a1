"""Seconds per image: brushwork vs diffusers' StableDiffusionPipeline on the same model folder.

Both pipelines run 20 steps with guidance 5 and the DPM++ 2M sampler on 64x64 images, at batch 1 and 4:
diffusers as it comes (fp32 eager), brushwork's default (fp32 eager, the same images as diffusers) and
brushwork with compile=True (AOTInductor with frozen weights, cached on disk; bf16 on CPUs with native bf16).

    python benchmarks/bench_generate.py [--model shapes] [--threads 2] [--repeats 5]
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from brushwork.generation.auto import BrushworkPipeline
from brushwork.generation.registry import resolve_model

PROMPT = "a red circle above a blue square"


def seconds_per_image(runs: dict, batch: int, repeats: int) -> dict[str, float]:
    """The best of `repeats` rounds for each run; rounds interleave the runs, so a slow spell of a shared
    machine hits them all alike."""
    for run in runs.values():
        run(batch)  # warm-up (and, for the compiled pipeline, compilation for this batch size)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(batch)
            times[name].append(time.perf_counter() - start)
    return {name: min(values) / batch for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes", help="model folder or shipped model name")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)

    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    eager = BrushworkPipeline.from_pretrained(folder, device="cpu", threads=args.threads)
    started = time.perf_counter()
    compiled = BrushworkPipeline.from_pretrained(folder, device="cpu", threads=args.threads, compile=True)
    reference.scheduler = DPMSolverMultistepScheduler.from_config(eager.model.scheduler_config)
    settings = dict(num_inference_steps=args.steps, guidance_scale=5.0, height=64, width=64)

    def run_reference(batch):
        generators = [torch.Generator().manual_seed(k) for k in range(batch)]
        return reference([PROMPT] * batch, generator=generators, **settings).images

    def run_brushwork(pipe):
        return lambda batch: pipe([PROMPT] * batch, seed=0, sampler="dpm++", **settings).images

    compiled([PROMPT], seed=0, num_inference_steps=1)
    print(f"{folder.name}: torch {torch.__version__}, {args.threads} threads, {args.steps} steps, 64x64, guidance 5; "
          f"compiled pipeline: {compiled.dtype}, first call {time.perf_counter() - started:.0f} s")
    for batch in (1, 4):
        seconds = seconds_per_image({"diffusers": run_reference, "eager": run_brushwork(eager),
                                     "compiled": run_brushwork(compiled)}, batch, args.repeats)
        ref, eager_s, compiled_s = seconds["diffusers"], seconds["eager"], seconds["compiled"]
        print(f"batch {batch}: diffusers {ref:.3f} s/image | brushwork {eager_s:.3f} ({ref / eager_s:.2f}x) | "
              f"brushwork compiled {compiled_s:.3f} ({ref / compiled_s:.2f}x)")

    a = np.stack([np.asarray(i, dtype=np.int16) for i in run_reference(4)])
    b = np.stack([np.asarray(i, dtype=np.int16) for i in run_brushwork(eager)(4)])
    c = np.stack([np.asarray(i, dtype=np.int16) for i in run_brushwork(compiled)(4)])
    print(f"pixel difference vs diffusers: brushwork max {np.abs(a - b).max()}/255; compiled max "
          f"{np.abs(a - c).max()}/255, mean {np.abs(a - c).mean():.2f}/255")


if __name__ == "__main__":
    main()
