"""`brushwork push`: share a model folder on the Hugging Face Hub."""

from pathlib import Path
from typing import Annotated, Optional

import typer


def push(
    model: Annotated[Path, typer.Argument(help="Model folder to upload (what `brushwork train` wrote).", show_default=False)],
    repo: Annotated[str, typer.Argument(help="Hub repository, NAMESPACE/NAME (created if it does not exist).", show_default=False)],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    token: Annotated[Optional[str], typer.Option(envvar="HF_TOKEN", help="Hub token.", show_default="the one `hf auth login` saved")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files that would be uploaded, and upload nothing.")] = False,
) -> None:
    """Upload a model folder to the Hugging Face Hub; runs/ and pickle files are refused."""
    from brushwork.hub import files_to_push, push as push_folder

    if dry_run:
        files = files_to_push(model)
        for path in files:
            typer.echo(f"{(model / path).stat().st_size:>12,}  {path.as_posix()}")
        total = sum((model / path).stat().st_size for path in files)
        typer.echo(f"{len(files)} files, {total / 1e6:.1f} MB would be uploaded to {repo}")
        return
    typer.echo(f"uploaded {model} to {repo}: {push_folder(model, repo, private=private, token=token)}")
