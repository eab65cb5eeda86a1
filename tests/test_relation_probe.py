import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "relation_probe.py"


def test_relation_probe_reports_held_out_accuracy_for_each_kind_of_relation_near_miss():
    result = subprocess.run([sys.executable, str(SCRIPT), "--model", "shapes", "--steps", "2", "--every", "1",
                             "--images", "400", "--batch-size", "4"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 1", "step 2"]
    for line in lines:
        match = re.search(r"opposite relation (\d\.\d\d), perpendicular relation (\d\.\d\d), objects swapped (\d\.\d\d)", line)
        assert match and all(0.0 <= float(value) <= 1.0 for value in match.groups())
    held_out = int(re.search(r"and (\d+) held-out", result.stdout).group(1))
    assert 0 < held_out < 40          # a quarter of the 40 held-out samples are position images


def test_relation_near_misses_are_named_by_what_changed(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from relation_probe import relation_near_misses

    assert relation_near_misses("a red circle above a blue square") == {
        "opposite relation": "a red circle below a blue square",
        "perpendicular relation": "a red circle left of a blue square",
        "objects swapped": "a blue square above a red circle"}


@pytest.mark.slow   # the refusal test below runs the same script in the default run
def test_unet_relation_probe_scores_each_kind_of_near_miss_against_the_own_caption():
    script = SCRIPT.parent / "unet_relation_probe.py"
    result = subprocess.run([sys.executable, str(script), "--model", "shapes", "--images", "6", "--timesteps", "500,800",
                             "--batch-size", "4"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("6 held-out position images")
    rows = [line.split() for line in result.stdout.splitlines() if line[:3] in ("500", "800")]
    assert [row[0] for row in rows] == ["500", "800"]
    for row in rows:
        shares = [float(value) for value in row[1:]]
        assert len(shares) == 4 and all(abs(share * 6 - round(share * 6)) < 0.05 for share in shares)  # k of 6
    assert float(rows[0][4]) >= 0.5     # the colour control: the shipped model knows its colours


def test_unet_relation_probe_refuses_a_gan():
    script = SCRIPT.parent / "unet_relation_probe.py"
    result = subprocess.run([sys.executable, str(script), "--model", "shapes-gan"], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode != 0 and "needs a UNet" in result.stderr
