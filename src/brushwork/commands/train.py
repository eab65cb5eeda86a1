"""`brushwork train ...` (placeholder until its owner fills it in)."""

import typer

app = typer.Typer(help="train commands", no_args_is_help=True)
