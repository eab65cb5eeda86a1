"""Copy a trained model folder into the package as a shipped model, weights stored in fp16.

    python scripts/ship_model.py /path/to/model shapes            # -> src/brushwork/assets/models/shapes
    python scripts/ship_model.py /path/to/gan shapes-gan --no-clip --text-encoder-from shapes

Training runs (checkpoints, logs, samples) stay behind. fp16 halves the package; loaders cast the weights to
the dtype they run in (fp32 on CPU), and the shipped model's eval numbers are measured on these files.
Nothing is stored twice: clip/ loses its text tower (the same weights as text_encoder/; brushwork.models.clip
puts it back), and a GAN whose text encoder equals a shipped model's names that model instead of a copy.
Every supported library version reads what is shipped: text_encoder/ keys carry the `text_model.` prefix
(transformers 5 saves them without it, which transformers 4 loads as random weights), and clip/ gets the
tokenizer's vocab.json and merges.txt (transformers 4's CLIPTokenizer cannot read tokenizer.json alone).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from brushwork.models.clip import text_encoder_state, vision_only_state

PACKAGE_MODELS = Path(__file__).resolve().parents[1] / "src" / "brushwork" / "assets" / "models"
LEFT_BEHIND = {"runs"}


def half(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: (t.half() if t.is_floating_point() else t).contiguous() for name, t in tensors.items()}


def write_config_without_local_paths(source: Path, target: Path, extra: dict | None = None) -> None:
    """diffusers and transformers record where a model was loaded from; that path means nothing after install."""
    config = json.loads(source.read_text())
    config.pop("_name_or_path", None)
    target.write_text(json.dumps(config | (extra or {}), indent=2, sort_keys=True) + "\n")


def tokenizer_definition(folder: Path) -> dict:
    """tokenizer.json without the padding and truncation a tokenizer last ran with (saved with it, not part of it)."""
    definition = json.loads((folder / "tokenizer.json").read_text())
    return {key: value for key, value in definition.items() if key not in ("padding", "truncation")}


def check_same_text_encoder(source: Path, shipped: str) -> None:
    """A GAN may drop its text_encoder/ and tokenizer/ only when they are the shipped model's, in fp16."""
    other = PACKAGE_MODELS / shipped
    ours = half(text_encoder_state(source / "text_encoder"))
    theirs = text_encoder_state(other / "text_encoder")
    same = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    same = same and tokenizer_definition(source / "tokenizer") == tokenizer_definition(other / "tokenizer")
    if not same:
        sys.exit(f"Error: the text encoder or tokenizer of {source} differs from the shipped {shipped!r}")


def ship(source: Path, name: str, keep_clip: bool = True, text_encoder_from: str | None = None) -> Path:
    target = PACKAGE_MODELS / name
    staging = PACKAGE_MODELS / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    skip = LEFT_BEHIND | (set() if keep_clip else {"clip"})
    if text_encoder_from:
        check_same_text_encoder(source, text_encoder_from)
        skip |= {"text_encoder", "tokenizer"}
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if relative.parts[0] in skip or not path.is_file():
            continue
        destination = staging / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if relative == Path("clip/model.safetensors") and (source / "text_encoder").is_dir():
            save_file(half(vision_only_state(path.parent)), destination, metadata={"format": "pt"})
        elif relative == Path("text_encoder/model.safetensors"):
            save_file(half(text_encoder_state(path.parent)), destination, metadata={"format": "pt"})
        elif path.suffix == ".safetensors":
            save_file(half(load_file(path)), destination, metadata={"format": "pt"})
        elif relative == Path("config.json") and text_encoder_from:
            write_config_without_local_paths(path, destination, {"text_encoder_from": text_encoder_from})
        elif path.name == "config.json":
            write_config_without_local_paths(path, destination)
        else:
            shutil.copy2(path, destination)
    if (staging / "clip").is_dir() and (source / "tokenizer").is_dir():
        for vocabulary in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            if not (staging / "clip" / vocabulary).exists() and (source / "tokenizer" / vocabulary).exists():
                shutil.copy2(source / "tokenizer" / vocabulary, staging / "clip" / vocabulary)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="model folder written by brushwork train")
    parser.add_argument("name", help="name of the shipped model (its folder under assets/models)")
    parser.add_argument("--no-clip", action="store_true", help="leave clip/ behind (the evaluation CLIP)")
    parser.add_argument("--text-encoder-from", metavar="NAME",
                        help="a GAN: use this shipped model's text encoder and tokenizer instead of a copy")
    args = parser.parse_args()
    if not args.source.is_dir():
        sys.exit(f"Error: {args.source} is not a model folder")
    target = ship(args.source, args.name, keep_clip=not args.no_clip, text_encoder_from=args.text_encoder_from)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"{target}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
