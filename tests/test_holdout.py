"""Hold-outs: the pattern grammar, what it leaves out of shapes data, `data shapes --hold-out`, and `train`
recording it in training.json and the model card."""

import json

import pytest
from typer.testing import CliRunner

from brushwork.cli import app
from brushwork.data.captions import all_captions
from brushwork.data.holdout import HOLD_OUT_FILE, HoldOut
from brushwork.data.shapes import ShapesDataset
from brushwork.errors import BrushworkError

runner = CliRunner()
ISSUE_EXAMPLE = "purple triangle,red square left of *,four circles"


def test_patterns_cover_what_they_say():
    hold_out = HoldOut.parse(ISSUE_EXAMPLE)
    assert hold_out.texts == ["purple triangle", "red square left of *", "four circles"]
    covered = {
        "a purple triangle": True, "a small purple triangle": True, "three purple triangles": True,
        "a purple triangle and a red circle": True, "a blue square above a purple triangle": True,
        "a purple square": False, "a red triangle": False,
        "a red square left of a blue circle": True,
        "a blue circle right of a red square": True,      # the same scene in the converse wording
        "a red square right of a blue circle": False, "a blue circle left of a red square": False,
        "a red square above a blue circle": False, "a red square and a blue circle": False,
        "four green circles": True, "three green circles": False, "four green squares": False,
        "a photo of a cat": False,                         # outside the grammar: never held out
    }
    assert {caption: hold_out.covers(caption) for caption in covered} == covered


def test_sizes_pairs_and_counts_of_any_object():
    assert HoldOut.parse("small red square").captions() == ["a small red square"]
    both = HoldOut.parse("red square and blue circle")
    assert both.covers("a blue circle and a red square") and both.covers("a red square below a blue circle")
    assert not both.covers("a red square and a green circle")
    assert HoldOut.parse("four *").captions("counting") == sorted(c for c in all_captions("counting")
                                                                   if c.startswith("four"))


@pytest.mark.parametrize("text, message", [
    ("pink triangle", "unknown colour 'pink'"),
    ("purple hexagon", "unknown shape 'hexagon'"),
    ("pink", "unknown colour or shape 'pink'"),
    ("red blue square", "two colors"),
    ("*", "every image"),
    ("red square left of", "an object is missing"),
    ("small red square left of *", "matches no caption"),
    ("circle,square,triangle", "leaves the single task no caption"),
    ("two *,three *,four *", "leaves the counting task no caption"),
])
def test_bad_hold_outs_name_the_problem(text, message):
    with pytest.raises(BrushworkError, match=message):
        HoldOut.parse(text)


def test_shapes_data_never_holds_a_held_out_caption_and_is_otherwise_unchanged():
    hold_out = HoldOut.parse(ISSUE_EXAMPLE)
    held = ShapesDataset(400, seed=3, hold_out=hold_out)
    plain = ShapesDataset(400, seed=3)
    captions = [held.scene(i).caption for i in range(400)]
    assert not any(hold_out.covers(caption) for caption in captions)
    # A scene whose first draw is not held out is drawn exactly as without a hold-out.
    same = [captions[i] == plain.scene(i).caption for i in range(400) if not hold_out.covers(plain.scene(i).caption)]
    assert all(same) and len(same) > 300


def test_data_shapes_writes_the_hold_out_and_train_records_it(tmp_path):
    data = tmp_path / "shapes"
    result = runner.invoke(app, ["data", "shapes", "--n", "32", "--out", str(data), "--hold-out", ISSUE_EXAMPLE])
    assert result.exit_code == 0, result.output
    assert json.loads((data / HOLD_OUT_FILE).read_text())["hold_out"] == HoldOut.parse(ISSUE_EXAMPLE).texts
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and not any(HoldOut.parse(ISSUE_EXAMPLE).covers(row["text"]) for row in rows)

    model = tmp_path / "model"
    result = runner.invoke(app, ["train", "clip", "--data", str(data), "--size", "tiny", "--steps", "1",
                                 "--out", str(model)])
    assert result.exit_code == 0, result.output
    facts = json.loads((model / "training.json").read_text())
    assert facts["data_report"]["hold_out"] == ["purple triangle", "red square left of *", "four circles"]
    assert "held out (never in training): `purple triangle`, `red square left of *`, `four circles`" in (
        model / "README.md").read_text()


def test_data_shapes_bad_hold_out_is_one_error_line(tmp_path):
    result = runner.invoke(app, ["data", "shapes", "--n", "4", "--out", str(tmp_path / "d"),
                                 "--hold-out", "purple triangle,grey circle"])
    assert result.exit_code == 1 and "Error:" in result.output and "'grey'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "d").exists()
