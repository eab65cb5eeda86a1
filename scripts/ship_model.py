"""Copy a trained model folder into the package as a shipped model, weights stored in fp16.

    python scripts/ship_model.py /path/to/model shapes            # -> src/brushwork/assets/models/shapes
    python scripts/ship_model.py /path/to/gan shapes-gan --no-clip

Training runs (checkpoints, logs, samples) stay behind. fp16 halves the package; loaders cast the weights to
the dtype they run in (fp32 on CPU), and the shipped model's eval numbers are measured on these files.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PACKAGE_MODELS = Path(__file__).resolve().parents[1] / "src" / "brushwork" / "assets" / "models"
LEFT_BEHIND = {"runs"}


def half_safetensors(source: Path, target: Path) -> None:
    tensors = {name: t.half() if t.is_floating_point() else t for name, t in load_file(source).items()}
    save_file({name: t.contiguous() for name, t in tensors.items()}, target, metadata={"format": "pt"})


def write_config_without_local_paths(source: Path, target: Path) -> None:
    """diffusers and transformers record where a model was loaded from; that path means nothing after install."""
    config = json.loads(source.read_text())
    config.pop("_name_or_path", None)
    target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def ship(source: Path, name: str, keep_clip: bool = True) -> Path:
    target = PACKAGE_MODELS / name
    staging = PACKAGE_MODELS / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    skip = LEFT_BEHIND | (set() if keep_clip else {"clip"})
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if relative.parts[0] in skip or not path.is_file():
            continue
        destination = staging / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            half_safetensors(path, destination)
        elif path.name == "config.json":
            write_config_without_local_paths(path, destination)
        else:
            shutil.copy2(path, destination)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="model folder written by brushwork train")
    parser.add_argument("name", help="name of the shipped model (its folder under assets/models)")
    parser.add_argument("--no-clip", action="store_true", help="leave clip/ behind (the evaluation CLIP)")
    args = parser.parse_args()
    if not args.source.is_dir():
        sys.exit(f"Error: {args.source} is not a model folder")
    target = ship(args.source, args.name, keep_clip=not args.no_clip)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"{target}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
