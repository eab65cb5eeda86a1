"""Do the shipped models give the same images under two installs (e.g. the pinned and the oldest supported
library versions)? Run `write` in each environment, then `compare` the two files.

    .venv/bin/python scripts/check_oldest_versions.py write /tmp/pinned.npz
    /tmp/oldest/bin/python scripts/check_oldest_versions.py write /tmp/oldest.npz
    python scripts/check_oldest_versions.py compare /tmp/pinned.npz /tmp/oldest.npz

`write` imports every brushwork module, then saves, for every shipped model, images from fixed prompts and
seeds (float arrays in [0, 1]), and for a model with a clip/ the CLIP embeddings that best_of ranks by.
`compare` fails when an array is missing from either file or differs by more than TOLERANCE. A text encoder
left with random weights gives other images entirely, far past it (and brushwork's loader refuses it first).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

PROMPTS = ["a red circle", "a blue square above a green triangle"]
EMOJI_PROMPTS = ["a smiling face", "a red heart"]
SEED = 7
STEPS = 8
# Pixels in [0, 1]. Other library versions reorder float sums (attention, schedulers): that moves pixels by
# about 1e-5 here; a wrong weight moves them by tenths.
TOLERANCE = 2e-3


def versions() -> str:
    import diffusers
    import torch
    import transformers
    return f"torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}"


def import_every_module() -> None:
    """Import failures (an API a library version lacks) show up here rather than in some later command."""
    import importlib
    import pkgutil

    import brushwork
    for module in pkgutil.walk_packages(brushwork.__path__, "brushwork."):
        importlib.import_module(module.name)


def write(out: Path) -> None:
    import torch
    from PIL import Image

    from brushwork.pipeline import BrushworkPipeline, shipped_models

    import_every_module()
    torch.set_grad_enabled(False)
    arrays = {}
    for name in shipped_models():
        pipe = BrushworkPipeline.from_pretrained(name, device="cpu")
        prompts = EMOJI_PROMPTS if name == "emoji" else PROMPTS
        steps = STEPS if pipe.model.kind == "diffusion" else 1
        arrays[f"{name}/images"] = pipe(prompts, seed=SEED, num_inference_steps=steps, output_type="np").images
        if pipe.clip_folder is not None and pipe.model.kind == "diffusion":
            images = [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arrays[f"{name}/images"]]
            arrays[f"{name}/clip_text"] = pipe.ranker.text_embeds(prompts).numpy()
            arrays[f"{name}/clip_image"] = pipe.ranker.image_embeds(images).numpy()
    np.savez(out, versions=np.array(versions()), **arrays)
    print(f"{out}: {len(arrays)} arrays ({versions()})")


def compare(first: Path, second: Path) -> int:
    a, b = np.load(first), np.load(second)
    print(f"{first}: {a['versions']}\n{second}: {b['versions']}")
    failed = False
    for key in sorted((set(a.files) | set(b.files)) - {"versions"}):
        if key not in a.files or key not in b.files:
            print(f"{key}: only in {first if key in a.files else second}")
            failed = True
            continue
        if a[key].shape != b[key].shape:
            print(f"{key}: shapes {a[key].shape} and {b[key].shape}")
            failed = True
            continue
        diff = float(np.abs(a[key].astype(np.float64) - b[key].astype(np.float64)).max())
        bad = diff > TOLERANCE
        failed |= bad
        print(f"{key}: max difference {diff:.2e}{'  > ' + str(TOLERANCE) if bad else ''}")
    print("different" if failed else f"same within {TOLERANCE}")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("write").add_argument("out", type=Path)
    compare_parser = commands.add_parser("compare")
    compare_parser.add_argument("first", type=Path)
    compare_parser.add_argument("second", type=Path)
    args = parser.parse_args()
    if args.command == "write":
        write(args.out)
    else:
        sys.exit(compare(args.first, args.second))


if __name__ == "__main__":
    main()
