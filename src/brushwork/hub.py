"""Sharing a model folder on the Hugging Face Hub (`brushwork push`), through huggingface_hub.

What is shared is the folder as diffusers reads it. Training runs (checkpoints with pickled optimizer state)
and pickle files are refused, not skipped: a folder that holds them was not made to be shared as it is.
"""

from pathlib import Path

from brushwork.errors import BrushworkError

# Files that unpickle code when loaded: a model one shares holds safetensors instead.
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


def files_to_push(folder: Path) -> list[Path]:
    """The files of `folder` an upload sends, relative to it: every file but hidden ones (.cache, .write-test-*).
    BrushworkError for a folder that is not a model, holds runs/, or holds pickles."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BrushworkError(f"model folder not found: {folder}")
    if (folder / "runs").is_dir():
        raise BrushworkError(f"{folder} holds runs/ (checkpoints with pickled optimizer state): move it out of the "
                             f"folder (brushwork trains into {folder.name}.runs/ beside it) and push again.")
    files = sorted(path.relative_to(folder) for path in folder.rglob("*")
                   if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    pickles = [str(path) for path in files if path.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise BrushworkError(f"{folder} holds pickle files, which run code when loaded: {', '.join(pickles)}. "
                             "Share safetensors weights only.")
    if not any(path.name in ("model_index.json", "config.json") for path in files if len(path.parts) == 1):
        raise BrushworkError(f"{folder} is not a model folder (no model_index.json or config.json): give a folder "
                             "written by `brushwork train`.")
    return files


def push(folder: Path, repo: str, private: bool = False, token: str | None = None) -> str:
    """Create `repo` (a model repository, if it does not exist) and upload the folder's files_to_push in one
    commit; the URL of that commit."""
    from huggingface_hub import HfApi

    files = files_to_push(folder)
    api = HfApi(token=token)
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo, repo_type="model",
                                   allow_patterns=[path.as_posix() for path in files],
                                   commit_message=f"Upload {Path(folder).name} with brushwork")
    except Exception as error:  # the Hub client's HTTP and network errors: their classes vary between versions
        raise BrushworkError(f"push to {repo} failed: {' '.join(str(error).split())}") from None
    return str(commit)
