"""constraints-oldest.txt pins every runtime dependency to pyproject.toml's lower bound, so .ci/run's
oldest-versions install tests the versions pyproject.toml claims to accept (an unpinned dependency resolves to
its newest release, which may not work with the other pins: newest pyarrow with numpy 1.26 did not)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# torch comes from constraints.txt (the CPU build); the oldest check keeps it.
PINNED_ELSEWHERE = {"torch"}


def lower_bounds() -> dict[str, str]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {}
    for requirement in dependencies:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=([0-9][0-9.]*)", requirement.replace(" ", ""))
        assert match, f"{requirement!r}: give every dependency a plain lower bound (name>=version)"
        bounds[match.group(1).lower()] = match.group(2)
    return bounds


def oldest_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints-oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def same_version(a: str, b: str) -> bool:
    def parts(v: str) -> list[int]:
        numbers = [int(x) for x in v.split(".")]
        while numbers and numbers[-1] == 0:
            numbers.pop()
        return numbers
    return parts(a) == parts(b)


def test_every_runtime_dependency_is_pinned_at_its_lower_bound():
    bounds, pins = lower_bounds(), oldest_pins()
    missing = sorted(set(bounds) - set(pins) - PINNED_ELSEWHERE)
    assert not missing, f"constraints-oldest.txt has no pin for {missing}"
    wrong = {name: (bounds[name], pins[name]) for name in bounds if name in pins and not same_version(bounds[name], pins[name])}
    assert not wrong, f"pyproject lower bound vs constraints-oldest pin differ: {wrong}"
    extra = sorted(set(pins) - set(bounds))
    assert not extra, f"constraints-oldest.txt pins {extra}, which pyproject.toml does not depend on"
