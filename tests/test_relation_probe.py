import re
import subprocess
import sys
from pathlib import Path

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
