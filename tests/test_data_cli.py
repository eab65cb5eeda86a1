"""`brushwork data ...` through the real CLI app: writing, refusing to overwrite, inspect, preview, errors."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from brushwork.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["data", *args])


def assert_clean_error(result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Error:" in result.output and fragment in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["shapes", "emoji", "inspect", "preview"])
def test_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_shapes_writes_images_captions_and_scenes(tmp_path):
    out = tmp_path / "shapes"
    result = run("shapes", "--n", "6", "--out", str(out), "--seed", "2", "--tasks", "counting=1")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(row["scene"]["task"] == "counting" for row in rows)
    assert all(row["text"] == row["scene"]["caption"] for row in rows)
    assert Image.open(out / rows[0]["file_name"]).size == (64, 64)

    assert_clean_error(run("shapes", "--n", "2", "--out", str(out)), "--overwrite")
    assert len(list((out / "images").iterdir())) == 6                    # untouched
    assert run("shapes", "--n", "2", "--out", str(out), "--overwrite").exit_code == 0
    assert len(list((out / "images").iterdir())) == 2


def test_shapes_bad_input_is_a_clean_error(tmp_path):
    assert_clean_error(run("shapes", "--n", "2", "--out", str(tmp_path / "a"), "--tasks", "single"), "NAME=WEIGHT")
    assert_clean_error(run("shapes", "--n", "2", "--out", str(tmp_path / "a"), "--tasks", "juggling=1"),
                       "juggling")
    assert_clean_error(run("shapes", "--n", "0", "--out", str(tmp_path / "a")), "--n")


def test_emoji_writes_attribution_and_counts(tmp_path):
    out = tmp_path / "emoji"
    result = run("emoji", "--out", str(out), "--size", "32", "--limit", "15")
    assert result.exit_code == 0, result.output
    assert "built 15 emoji" in result.output
    assert "CC BY-SA 4.0" in (out / "ATTRIBUTION").read_text()
    assert (out / "metadata.jsonl").read_text().count("\n") == 15


def test_inspect_and_preview(tmp_path):
    data = tmp_path / "data"
    assert run("shapes", "--n", "5", "--out", str(data)).exit_code == 0
    (data / "images" / "000003.png").write_bytes(b"\x89PNG broken")
    result = run("inspect", str(data))
    assert result.exit_code == 0, result.output
    assert "usable image-caption pairs: 4" in result.output and "problems: 1" in result.output
    assert "images/000003.png: not an image" in result.output
    assert "caption words" in result.output

    grid = tmp_path / "grid.png"
    result = run("preview", str(data), "--out", str(grid), "--n", "3")
    assert result.exit_code == 0, result.output
    image = Image.open(grid)
    assert image.width > 2 * 128 and image.height > 128                   # 3 cells with caption space


def test_inspect_and_preview_bad_paths_are_clean_errors(tmp_path):
    assert_clean_error(run("inspect", str(tmp_path / "missing")), "not found")
    assert_clean_error(run("preview", "nonexistent-name"), "Accepted")
    assert_clean_error(run("preview", "shapes", "--out", str(tmp_path / "grid.jpg")), ".png")
