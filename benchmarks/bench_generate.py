"""Seconds per image: brushwork vs diffusers' StableDiffusionPipeline on the same folder.

A ~7M-parameter SD-shaped model (64x64 images, 16x16 latents, cross-attention dim 256) is built under
/tmp on first use. Both pipelines run 20 steps with guidance 5 and the DPM++ 2M sampler, at batch 1 and 4.

    python benchmarks/bench_generate.py [--threads 2] [--repeats 3]
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from brushwork.pipeline import CLIP_TOKENIZER_DIR, BrushworkPipeline

MODEL = Path("/tmp/brushwork-bench-sd7m")
PROMPT = "a red circle above a blue square"


def build_model(path: Path) -> None:
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
                        sample_size=64)
    with torch.no_grad():
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    print(f"built {path}: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters")


def seconds_per_image(run, batch: int, repeats: int) -> float:
    run(batch)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return min(times) / batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (MODEL / "model_index.json").exists():
        build_model(MODEL)

    reference = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    fast = BrushworkPipeline.from_pretrained(MODEL, device="cpu")
    bf16 = BrushworkPipeline.from_pretrained(MODEL, device="cpu", dtype=torch.bfloat16)
    reference.scheduler = DPMSolverMultistepScheduler.from_config(fast.model.scheduler_config)
    settings = dict(num_inference_steps=args.steps, guidance_scale=5.0, height=64, width=64)

    def run_reference(batch):
        generators = [torch.Generator().manual_seed(k) for k in range(batch)]
        return reference([PROMPT] * batch, generator=generators, **settings).images

    def run_brushwork(pipe):
        return lambda batch: pipe([PROMPT] * batch, seed=0, sampler="dpm++", **settings).images

    print(f"torch {torch.__version__}, torch threads {args.threads}, {args.steps} steps, 64x64, guidance 5; "
          f"brushwork default: {fast.dtype}, {fast.threads} sampling thread(s)")
    for batch in (1, 4):
        ref = seconds_per_image(run_reference, batch, args.repeats)
        fast_s = seconds_per_image(run_brushwork(fast), batch, args.repeats)
        bf16_s = seconds_per_image(run_brushwork(bf16), batch, args.repeats)
        torch.set_num_threads(fast.threads)
        ref_same_threads = seconds_per_image(run_reference, batch, args.repeats)
        torch.set_num_threads(args.threads)
        print(f"batch {batch}: diffusers {ref:.3f} s/image | brushwork {fast_s:.3f} s/image "
              f"({ref / fast_s:.2f}x) | brushwork bf16 autocast {bf16_s:.3f} ({ref / bf16_s:.2f}x) | "
              f"diffusers with brushwork's thread count {ref_same_threads:.3f} ({ref_same_threads / fast_s:.2f}x)")

    a = np.stack([np.asarray(i, dtype=np.int16) for i in run_reference(4)])
    b = np.stack([np.asarray(i, dtype=np.int16) for i in run_brushwork(fast)(4)])
    c = np.stack([np.asarray(i, dtype=np.int16) for i in run_brushwork(bf16)(4)])
    print(f"max pixel difference vs diffusers: brushwork default {np.abs(a - b).max()}/255, "
          f"bf16 {np.abs(a - c).max()}/255 (mean {np.abs(a - c).mean():.2f}/255)")


if __name__ == "__main__":
    main()
