"""The models shipped with brushwork, model names and paths, and the weights hash recorded in PNGs."""

import hashlib
from pathlib import Path

from brushwork.errors import BrushworkError

ASSETS_DIR = Path(__file__).parent.parent / "assets"
SHIPPED_MODELS_DIR = ASSETS_DIR / "models"
DEFAULT_MODEL = "shapes"


def shipped_models() -> list[str]:
    """Names of the models installed with brushwork (folders under assets/models)."""
    if not SHIPPED_MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_MODELS_DIR.iterdir() if p.is_dir() and not p.name.startswith("."))


def resolve_model(model: str | Path | None) -> Path:
    """A model path, or the name of a shipped model ("shapes", "shapes-gan"); None means the default shipped
    model, whatever lies in the working folder. A path that exists wins over a shipped name given by hand."""
    if model is None:
        if DEFAULT_MODEL not in shipped_models():
            raise BrushworkError("no default model is installed with this brushwork; pass --model PATH (a model "
                                 "folder or .safetensors file)")
        return SHIPPED_MODELS_DIR / DEFAULT_MODEL
    path = Path(model).expanduser()
    if not path.exists() and str(model) in shipped_models():
        return SHIPPED_MODELS_DIR / str(model)
    return path


def check_model_exists(path: Path) -> None:
    if not path.exists():
        shipped = ", ".join(shipped_models()) or "none"
        raise BrushworkError(f"model not found: {path} (the models shipped with brushwork: {shipped})")


def weights_hash(path: Path) -> str:
    """First 10 hex digits of sha256 over the weights: the file itself (as AUTOMATIC1111 does), or a
    folder's weight files in path order."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt") and p.is_file())
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:10]
