"""The README's emoji grid: 16 emoji names through a model, each above the OpenMoji image it was trained on.

It also prints how recognisable they are: the rank of each name's own OpenMoji image among all the emoji of
the data set, ordered by pixel distance to the generated image (rank 1: no other emoji is nearer).

    python scripts/emoji_grid.py                      # shipped `emoji` model -> docs/emoji-grid.png
    python scripts/emoji_grid.py --model my-emoji --out grid.png --seed 3
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from brushwork.data.dataset import emoji_folder
from brushwork.eval.report import make_grid
from brushwork.generation.auto import BrushworkPipeline

NAMES = ["grinning face", "red heart", "fire", "thumbs up", "pile of poo", "rocket", "cat face", "dog face",
         "pizza", "sun", "rainbow", "ghost", "alien", "unicorn", "snowman", "four leaf clover"]
COLUMNS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="emoji", help="model folder or shipped name")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "emoji-grid.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    args = parser.parse_args()

    generated = BrushworkPipeline.from_pretrained(args.model)(
        NAMES, seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance).images
    folder = emoji_folder(64)
    items = [json.loads(line) for line in (folder / "metadata.jsonl").open()]
    names = [item["text"] for item in items]
    pixels = np.stack([np.asarray(Image.open(folder / item["file_name"]).convert("RGB"), np.float32).ravel()
                       for item in items])
    real = [Image.open(folder / items[names.index(name)]["file_name"]) for name in NAMES]
    ranks = []
    for name, image in zip(NAMES, generated):
        distances = ((pixels - np.asarray(image, np.float32).ravel()) ** 2).sum(axis=1)
        ranks.append(int((distances < distances[names.index(name)]).sum()) + 1)
    print(", ".join(f"{name}: {rank}" for name, rank in zip(NAMES, ranks)))
    print(f"own OpenMoji nearest for {sum(r == 1 for r in ranks)} of {len(NAMES)}, among the nearest 10 for "
          f"{sum(r <= 10 for r in ranks)}; median rank {int(np.median(ranks))} of {len(items):,}")
    images, captions = [], []
    for row in range(0, len(NAMES), COLUMNS):   # a row of generated images, then their OpenMoji originals
        images += generated[row:row + COLUMNS] + real[row:row + COLUMNS]
        captions += NAMES[row:row + COLUMNS] + ["(OpenMoji)"] * COLUMNS
    make_grid(images, captions, columns=COLUMNS).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
