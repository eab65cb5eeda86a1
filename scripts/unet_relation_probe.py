"""Does a trained diffusion model use the relation word? A diffusion-classifier probe of its UNet.

For held-out shapes position images it noises each image's latents once per timestep and asks the UNet to
denoise them twice: conditioned on the image's own caption and on a near miss of it. Where the model has
learned what the caption says, the own caption denoises better (lower error) far more often than not; where
it ignores a word, the two errors are a coin toss (0.5). A colour near miss is the control: every trained
model should get it right. Nothing is trained; the images come from the shapes renderer, never from the model.

    python scripts/unet_relation_probe.py --model shapes
    python scripts/unet_relation_probe.py --model my-model --images 200 --timesteps 300,500,800
"""

import argparse
import sys

import torch
from diffusers import DDPMScheduler
from relation_probe import position_items, relation_near_misses

from brushwork.data.captions import contradictions_by_kind
from brushwork.generation.auto import BrushworkPipeline
from brushwork.generation.pipeline import LatentDiffusionPipeline

KINDS = ("opposite relation", "perpendicular relation", "objects swapped", "colour (control)")


def near_misses(text: str) -> dict[str, str]:
    return relation_near_misses(text) | {"colour (control)": contradictions_by_kind(text)["color"][0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes", help="diffusion model folder or shipped name")
    parser.add_argument("--images", type=int, default=200, help="held-out position images to score")
    parser.add_argument("--timesteps", default="300,500,800", help="comma-separated noise levels (0-999)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipe = BrushworkPipeline.from_pretrained(args.model, device="cpu")
    if not isinstance(pipe, LatentDiffusionPipeline):
        sys.exit(f"Error: {args.model} is a {pipe.model.kind} model; this probe needs a UNet")
    model = pipe.model
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    items = position_items(args.seed + 777, args.images * 8 + 40)[: args.images]  # about 1 in 4 are position
    timesteps = [int(t) for t in args.timesteps.split(",")]
    wins = {t: {kind: 0 for kind in KINDS} for t in timesteps}
    for start in range(0, len(items), args.batch_size):
        batch = items[start:start + args.batch_size]
        images = torch.stack([item["pixel_values"] for item in batch])
        own = [item["text"] for item in batch]
        with torch.no_grad():
            latents = model.vae.encode(images).latent_dist.mode() * model.vae.config.scaling_factor
            conditions = {"own": model.encode(own)} | {kind: model.encode([near_misses(t)[kind] for t in own])
                                                        for kind in KINDS}
            for t in timesteps:
                noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(args.seed * 1000 + t + start))
                steps = torch.full((len(latents),), t)
                noisy = scheduler.add_noise(latents, noise, steps)
                target = (scheduler.get_velocity(latents, noise, steps)
                          if scheduler.config.prediction_type == "v_prediction" else noise)
                errors = {name: ((model.unet(noisy, steps, encoder_hidden_states=text).sample - target) ** 2)
                          .mean(dim=(1, 2, 3)) for name, text in conditions.items()}
                for kind in KINDS:
                    wins[t][kind] += int((errors["own"] < errors[kind]).sum())
    print(f"{len(items)} held-out position images; model {args.model}")
    print("share of images the own caption denoises better than the near miss (0.5: the word is ignored)")
    print("t     " + "  ".join(f"{kind:>22s}" for kind in KINDS))
    for t in timesteps:
        print(f"{t:<5d} " + "  ".join(f"{wins[t][kind] / len(items):>22.2f}" for kind in KINDS))


if __name__ == "__main__":
    main()
