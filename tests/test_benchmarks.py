"""Every benchmark script still imports and parses its arguments: they are run by hand, so nothing else notices
when a module they import from moves."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# One interpreter runs every script's --help (torch is imported once) and prints the ones that fail.
RUN_ALL = """
import contextlib, io, runpy, sys, traceback
from pathlib import Path
sys.path.insert(0, ".")
failed = []
for script in sorted(Path(".").glob("bench_*.py")):
    sys.argv = [script.name, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script.name, run_name="__main__")
    except SystemExit as stop:
        if stop.code in (0, None) and "usage" in out.getvalue().lower():
            continue
    except BaseException:
        traceback.print_exc()
    failed.append(script.name)
print("FAILED", *failed)
"""


@pytest.mark.slow
def test_every_benchmark_script_starts():
    result = subprocess.run([sys.executable, "-c", RUN_ALL], cwd=BENCHMARKS, capture_output=True, text=True,
                            timeout=300)
    assert len(list(BENCHMARKS.glob("bench_*.py"))) >= 10
    assert result.stdout.strip().splitlines()[-1] == "FAILED", result.stdout[-1000:] + result.stderr[-3000:]
