"""Training throughput (images/s) of each stage at a model size, and what pays for the UNet on this machine.

Part 1 runs each stage through brushwork.train.loop.run (the real loop: data, autocast, clipping, AdamW,
EMA for the UNet) for --warmup + --steps steps and reports the loop's own images/s over the measured steps; the
VAE on whole images and on the recipe's crops of half the side.
Part 2 times bare UNet steps (forward, backward, AdamW) on fixed tensors: fp32 eager (the reference) against
bf16 autocast, channels_last, 1 vs 2 threads and, with --compile, torch.compile.

    python benchmarks/bench_train.py --size small --steps 20
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from brushwork.data.dataset import open_dataset
from brushwork.hardware import cpu_has_native_bf16
from brushwork.models.sizes import build_clip, build_unet, build_vae, get_size
from brushwork.tokenizer import train_tokenizer
from brushwork.train.loop import TrainConfig, run
from brushwork.train.options import RecipeConfig
from brushwork.train.stages import ClipStage, UnetStage, VaeStage, normalize_latents, text_encoder_from_clip


def loop_throughput(stage, work: Path, batch_size: int, warmup: int, steps: int, **config) -> float:
    result = run(stage, TrainConfig(work / stage.name, max_steps=warmup + steps, batch_size=batch_size,
                                    log_every=warmup, checkpoint_every=0, **config))
    records = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    return records[-1]["images_per_s"]   # the last interval holds only the measured steps


def unet_step_time(unet, batch_size: int, hidden: int, steps: int, bf16: bool, channels_last: bool,
                   compile_model: bool) -> float:
    unet = unet.to(memory_format=torch.channels_last) if channels_last else unet
    model = torch.compile(unet) if compile_model else unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    latents = torch.randn(batch_size, 4, 16, 16)
    latents = latents.to(memory_format=torch.channels_last) if channels_last else latents
    text = torch.randn(batch_size, 77, hidden)
    timesteps = torch.randint(0, 1000, (batch_size,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (model(latents, timesteps, text).sample.float() - latents).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3 if compile_model else 2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile, in the loop (TrainConfig.compile) "
                        "and in part 2 (slow to compile: give --warmup room for it)")
    parser.add_argument("--skip-loop", action="store_true", help="only part 2")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # bf16 only where it is native: emulated (an AVX2-only CPU), a UNet step is about 17x slower than in fp32
    native_bf16 = cpu_has_native_bf16() or torch.cuda.is_available()
    size = get_size(args.size)
    batch_size = args.batch_size or size.batch_sizes["unet"]   # every stage at one batch, to compare images/s
    print(f"size {size.name}, batch {batch_size}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    if not args.skip_loop:
        data = open_dataset("shapes", n=batch_size * (args.warmup + args.steps))
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            tokenizer = train_tokenizer(data.captions(), work / "tokenizer")
            precisions = ("no", "bf16") if native_bf16 else ("no",)
            for precision, compiled in [(p, c) for p in precisions for c in (False, True)[:1 + args.compile]]:
                clip, vae = build_clip(size, len(tokenizer)), build_vae(size)
                shared = dict(mixed_precision=precision, compile=compiled)
                run_dir = work / f"{precision}-{'compiled' if compiled else 'eager'}"
                clip_rate = loop_throughput(ClipStage(data, tokenizer, clip), run_dir, batch_size,
                                            args.warmup, args.steps, **shared)
                vae_stage = VaeStage(data, vae)   # whole images
                vae_rate = loop_throughput(vae_stage, run_dir, batch_size, args.warmup, args.steps, **shared)
                crop = size.resolution // 2   # the recipe's default --vae-crop
                crop_rate = loop_throughput(VaeStage(data, build_vae(size), crop=crop), run_dir / "crops", batch_size,
                                            args.warmup, args.steps, **shared)
                normalize_latents(vae_stage.vae.eval(), data, num_samples=batch_size)
                recipe = RecipeConfig(data="shapes", out="-")   # the recipe's UNet objective: v, zero SNR, attention loss
                unet_stage = UnetStage(data, build_unet(size), text_encoder_from_clip(clip), tokenizer, vae_stage.vae,
                                       prediction_type=recipe.prediction_type, zero_terminal_snr=recipe.zero_terminal_snr,
                                       attention_loss=recipe.attention_loss)
                cache, started = unet_stage.dataset(), time.perf_counter()   # fill the latent cache first
                for start in range(0, len(cache), batch_size):
                    items = [cache[i] for i in range(start, min(len(cache), start + batch_size))]
                    unet_stage.batch_latents(unet_stage.collate(items))
                cache_rate = len(data) / (time.perf_counter() - started)
                unet_rate = loop_throughput(unet_stage, run_dir, batch_size, args.warmup, args.steps,
                                            ema_decay=0.999, **shared)
                variant = f"{precision:4}{', compiled' if compiled else ''}"
                print(f"loop, precision {variant}: clip {clip_rate:6.1f} img/s   vae {vae_rate:6.1f} img/s "
                      f"(crops of {crop}: {crop_rate:6.1f}, x{crop_rate / vae_rate:.2f})   "
                      f"unet {unet_rate:6.1f} img/s (latent caching {cache_rate:.0f} img/s)", flush=True)

    hidden = size.clip_text["hidden_size"]
    variants = [("fp32 eager (reference)", 2, False, False, False), ("bf16 autocast", 2, True, False, False),
                ("channels_last", 2, False, True, False), ("bf16 + channels_last", 2, True, True, False),
                ("fp32, 1 thread", 1, False, False, False), ("bf16, 1 thread", 1, True, False, False)]
    if args.compile:
        variants += [("torch.compile fp32", 2, False, False, True), ("torch.compile bf16", 2, True, False, True)]
    if not native_bf16:
        variants = [v for v in variants if not v[2]]
    reference = None
    for name, threads, bf16, channels_last, compile_model in variants:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        seconds = unet_step_time(build_unet(size), batch_size, hidden, args.steps, bf16, channels_last, compile_model)
        reference = reference or seconds
        print(f"unet step, {name:24}: {seconds:.3f} s/step  {batch_size / seconds:6.1f} img/s  "
              f"x{reference / seconds:.2f} vs fp32 eager", flush=True)


if __name__ == "__main__":
    main()
