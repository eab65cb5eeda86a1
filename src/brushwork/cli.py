"""The `brushwork` command. Each concern owns a module under brushwork.commands; this file only wires them."""

import warnings

import typer
from typer.core import TyperGroup

from brushwork.commands import data, eval, generate, serve, train
from brushwork.errors import BrushworkError


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"Warning: {message}", err=True)


class _Group(TyperGroup):
    """Turns BrushworkError from any subcommand into a `Error: ...` line on stderr and exit code 1, and
    warnings into `Warning: ...` lines (no source file and line)."""

    def invoke(self, ctx):
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
app.add_typer(data.app, name="data")
app.add_typer(train.app, name="train")
app.command("generate")(generate.generate)
app.command("info")(generate.info)
app.command("eval")(eval.evaluate)
app.command("serve")(serve.serve)
app.add_typer(serve.watermark_app, name="watermark")

if __name__ == "__main__":
    app()
