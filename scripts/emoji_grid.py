"""The README's emoji grid: 16 emoji names through a model, each above the OpenMoji image it was trained on.

    python scripts/emoji_grid.py                      # shipped `emoji` model -> docs/emoji-grid.png
    python scripts/emoji_grid.py --model my-emoji --out grid.png --seed 3
"""

import argparse
import json
from pathlib import Path

from PIL import Image

from brushwork.data.dataset import emoji_folder
from brushwork.eval.report import make_grid
from brushwork.pipeline import BrushworkPipeline

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
    files = {item["text"]: item["file_name"] for item in map(json.loads, (folder / "metadata.jsonl").open())}
    real = [Image.open(folder / files[name]) for name in NAMES]
    images, captions = [], []
    for row in range(0, len(NAMES), COLUMNS):   # a row of generated images, then their OpenMoji originals
        images += generated[row:row + COLUMNS] + real[row:row + COLUMNS]
        captions += NAMES[row:row + COLUMNS] + ["(OpenMoji)"] * COLUMNS
    make_grid(images, captions, columns=COLUMNS).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
