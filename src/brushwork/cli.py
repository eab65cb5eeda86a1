"""The `brushwork` command. Each concern owns a module under brushwork.commands; this file only wires them.

Nothing here imports torch, diffusers or transformers: each command imports them when it runs, so that
`brushwork --help` answers at once (a test holds this).
"""

import io
import sys
import time
import warnings

import typer
from typer.core import TyperGroup

from brushwork import __version__
from brushwork.commands import data, eval, generate, push, serve, train
from brushwork.commands.train import COMMAND_STARTED
from brushwork.errors import BrushworkError


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"Warning: {message}", err=True)


class _Group(TyperGroup):
    """Turns BrushworkError from any subcommand into a `Error: ...` line on stderr and exit code 1, and
    warnings into `Warning: ...` lines (no source file and line). Notes when the command started in ctx.meta
    (COMMAND_STARTED), before a command imports torch: `train --max-minutes` counts from there."""

    def invoke(self, ctx):
        ctx.meta.setdefault(COMMAND_STARTED, time.time())
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            try:
                return super().invoke(ctx)
            except BrushworkError as error:
                typer.echo(f"Error: {error}", err=True)
                raise typer.Exit(1) from None


app = typer.Typer(
    name="brushwork",
    cls=_Group,
    help="Train, generate, serve and evaluate text-to-image models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"brushwork {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                      help="Print brushwork's version and exit.")) -> None:
    """Train, generate, serve and evaluate text-to-image models."""
    # Redirected to a file (nohup, CI), stdout is block-buffered: a training run's lines would wait for the
    # buffer to fill, minutes apart. One line at a time instead.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)


app.add_typer(data.app, name="data")
app.add_typer(train.app, name="train")
app.command("generate")(generate.generate)
app.command("info")(generate.info)
app.command("eval")(eval.evaluate)
app.command("serve")(serve.serve)
app.command("push")(push.push)
app.add_typer(serve.watermark_app, name="watermark")

if __name__ == "__main__":
    app()
