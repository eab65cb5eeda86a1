"""The `brushwork` command itself: --version, defaults in --help, and an import that leaves torch alone."""

import subprocess
import sys

from typer.testing import CliRunner

from brushwork import __version__
from brushwork.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"brushwork {__version__}"


def test_help_shows_the_defaults_of_options_that_default_to_none():
    result = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.strip("│ ").startswith("--")}
    assert "[default: (1)]" in lines["--num-images"] and "[default: (20; 4 for a few-step model)]" in lines["--steps"]
    assert "[default: (dpm++; lcm for a few-step model)]" in lines["--sampler"] and "[default: 4]" in lines["--batch-size"]


def test_the_cli_imports_no_torch_diffusers_or_transformers():
    """`brushwork --help` must answer in well under a second: importing torch and diffusers takes 5-10 s."""
    heavy = ("torch", "diffusers", "transformers", "accelerate", "datasets", "fastapi", "PIL")
    code = f"import sys, brushwork.cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_a_command_writing_to_a_file_writes_whole_lines_at_once():
    """Redirected to a file, Python buffers stdout in blocks: a training run's lines would arrive minutes late."""
    code = ("import sys, brushwork.cli; before = sys.stdout.line_buffering; brushwork.cli.main(version=False); "
            "print(before, sys.stdout.line_buffering, sys.stderr.line_buffering)")
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.split() == ["False", "True", "True"]
