"""`brushwork data ...` (placeholder until its owner fills it in)."""

import typer

app = typer.Typer(help="data commands", no_args_is_help=True)
