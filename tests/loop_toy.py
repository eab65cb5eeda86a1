"""Toy stages for the training-loop tests: a small MLP regressing a fixed synthetic data set, and a tiny GAN.

Also a script, so a run can be killed or launched on several processes:
    python tests/loop_toy.py --out DIR --steps N [--resume]
    torchrun --nproc_per_node 2 tests/loop_toy.py --out DIR --steps N
    accelerate launch --num_processes 2 --cpu tests/loop_toy.py --out DIR --steps N
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from brushwork.errors import BrushworkError
from brushwork.train.loop import BaseStage, TrainConfig, run

IN_DIM, OUT_DIM = 8, 4


class ToyData(Dataset):
    """y = tanh(x W) for fixed random x, W; `augment` adds input noise from the global torch RNG."""

    def __init__(self, n: int = 96, augment: float = 0.0):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, IN_DIM, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(IN_DIM, OUT_DIM, generator=g))
        self.augment = augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        x = self.x[i]
        if self.augment:
            x = x + self.augment * torch.randn(IN_DIM)
        return {"x": x, "y": self.y[i]}


class ToyStage(BaseStage):
    """MLP regression. noise: input noise drawn from the loss generator; nan_at_call: loss NaN from that call on;
    delay: seconds of sleep per loss call (so a run lasts long enough to be killed)."""

    name = "toy"

    def __init__(self, width: int = 32, dropout: float = 0.0, noise: float = 0.0, augment: float = 0.0,
                 nan_at_call: int | None = None, delay: float = 0.0):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(IN_DIM, width), nn.Tanh(), nn.Dropout(dropout), nn.Linear(width, OUT_DIM))
        self.width, self.dropout, self.noise, self.augment = width, dropout, noise, augment
        self.nan_at_call, self.delay, self.calls = nan_at_call, delay, 0

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def dataset(self) -> Dataset:
        return ToyData(augment=self.augment)

    def fingerprint(self) -> dict:
        return {"width": self.width, "dropout": self.dropout, "noise": self.noise, "augment": self.augment}

    def loss(self, optimizer, modules, batch, generator):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        x = batch["x"]
        if self.noise:
            x = x + self.noise * torch.randn(x.shape, generator=generator, device=generator.device)
        pred = modules["net"](x)
        loss = F.mse_loss(pred, batch["y"])
        if self.nan_at_call is not None and self.calls >= self.nan_at_call:
            loss = loss * float("nan")
        return loss, {"mae": (pred - batch["y"]).detach().abs().mean()}

    def sample(self, modules, step):
        weight = modules["net"][0].weight.detach()
        pixels = ((weight - weight.min()) / (weight.max() - weight.min() + 1e-8) * 255).to(torch.uint8)
        return Image.fromarray(pixels.cpu().numpy()).convert("RGB")


class ToyGan(BaseStage):
    """G maps noise to 8-d points, D tells them from the data's x; D is stepped first, then G."""

    name = "toy-gan"

    def __init__(self):
        torch.manual_seed(0)
        self.g = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, IN_DIM))
        self.d = nn.Sequential(nn.Linear(IN_DIM, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def modules(self):
        return {"g": self.g, "d": self.d}

    def optimizers(self):
        return {"d": ["d"], "g": ["g"]}

    def dataset(self):
        return ToyData()

    def fingerprint(self):
        return {"toy": "gan"}

    def loss(self, optimizer, modules, batch, generator):
        real = batch["x"]
        z = torch.randn(real.shape[0], 4, generator=generator, device=generator.device)
        if optimizer == "d":
            with torch.no_grad():
                fake = modules["g"](z)
            logits = modules["d"](torch.cat([real, fake])).squeeze(1)
            target = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).to(logits.device)
            loss = F.binary_cross_entropy_with_logits(logits, target)
            return loss, {"d_real": logits[: len(real)].detach().mean()}
        logits = modules["d"](modules["g"](z)).squeeze(1)
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)), {}


def make_config(out: Path, steps: int, **overrides) -> TrainConfig:
    """The tests' shared defaults: fp32 (exact), small batches, frequent checkpoints."""
    values = dict(out_dir=Path(out), max_steps=steps, batch_size=16, lr=1e-2, mixed_precision="no",
                  checkpoint_every=5, keep_checkpoints=2, log_every=1, grad_clip=1.0)
    values.update(overrides)
    return TrainConfig(**values)


def main() -> None:
    torch.set_num_threads(1 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else min(2, os.cpu_count() or 1))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--ema", type=float, default=None)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--augment", type=float, default=0.0)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    stage = ToyStage(dropout=args.dropout, noise=args.noise, augment=args.augment, delay=args.delay)
    config = make_config(args.out, args.steps, resume=args.resume, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, checkpoint_every=args.checkpoint_every,
                         log_every=args.log_every, ema_decay=args.ema)
    try:
        run(stage, config)
    except BrushworkError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
