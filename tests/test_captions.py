import pytest

from brushwork.data.captions import (
    ObjectSpec,
    PromptSpec,
    all_captions,
    all_specs,
    contradicting_captions,
    contradictions_by_direction_and_axis,
    contradictions_by_kind,
    format_caption,
    parse_caption,
)


def test_grammar_size_and_order():
    captions = all_captions()
    # single 6*3*3, counting 6*3*3, two objects 18*15 ordered pairs of different colours, position 4x that
    assert len(captions) == 54 + 54 + 270 + 1080
    assert captions == sorted(set(captions))
    assert {t: len(all_captions(t)) for t in ("single", "counting", "two_objects", "position")} == {
        "single": 54, "counting": 54, "two_objects": 270, "position": 1080}
    assert sorted(all_captions("single") + all_captions("counting") + all_captions("two_objects")
                  + all_captions("position")) == captions


def test_format_parse_round_trip():
    for caption in all_captions():
        assert format_caption(parse_caption(caption)) == caption
    for spec in all_specs():
        assert parse_caption(format_caption(spec)) == spec


@pytest.mark.parametrize("caption, spec", [
    ("a red circle", PromptSpec("single", (ObjectSpec("red", "circle"),))),
    ("a small green square", PromptSpec("single", (ObjectSpec("green", "square", "small"),))),
    ("a large orange triangle", PromptSpec("single", (ObjectSpec("orange", "triangle", "large"),))),
    ("three purple triangles", PromptSpec("counting", (ObjectSpec("purple", "triangle"),), count=3)),
    ("a blue square and a yellow circle",
     PromptSpec("two_objects", (ObjectSpec("blue", "square"), ObjectSpec("yellow", "circle")))),
    ("a red circle left of a blue circle",
     PromptSpec("position", (ObjectSpec("red", "circle"), ObjectSpec("blue", "circle")), relation="left of")),
    ("a red circle right of a blue square",
     PromptSpec("position", (ObjectSpec("red", "circle"), ObjectSpec("blue", "square")), relation="right of")),
    ("a green triangle below a orange square",
     PromptSpec("position", (ObjectSpec("green", "triangle"), ObjectSpec("orange", "square")), relation="below")),
])
def test_parse_examples(caption, spec):
    assert parse_caption(caption) == spec
    assert format_caption(spec) == caption


def test_parse_ignores_case_and_spacing():
    assert parse_caption("  A   Red CIRCLE above a blue square ") == parse_caption("a red circle above a blue square")


@pytest.mark.parametrize("caption, words", [
    ("", "empty"),
    ("a pink circle", "colour 'pink'"),
    ("a red hexagon", "shape 'hexagon'"),
    ("red circle", "article"),
    ("five red circles", "article"),
    ("one red circle", "article"),
    ("two red circle", "plural shape"),
    ("two red circles please", "counting caption"),
    ("two small red circles", "counting caption"),
    ("a medium red circle", "colour 'medium'"),
    ("a red circle and a red square", "different colours"),
    ("a red circle above a red square", "different colours"),
    ("a small red circle and a blue square", "size"),
    ("a red circle and a large blue square", "colour 'large'"),
    ("a red circle next to a blue square", "'next to a blue square'"),
    ("a red circle left a blue square", "expected 'and'"),
    ("a red circle and", "ends early"),
    ("a red circle above a blue square now", "extra words"),
])
def test_parse_rejects_bad_captions(caption, words):
    with pytest.raises(ValueError, match=words):
        parse_caption(caption)


@pytest.mark.parametrize("spec", [
    PromptSpec("single", (ObjectSpec("pink", "circle"),)),
    PromptSpec("counting", (ObjectSpec("red", "circle"),), count=5),
    PromptSpec("two_objects", (ObjectSpec("red", "circle"), ObjectSpec("red", "square"))),
    PromptSpec("two_objects", (ObjectSpec("red", "circle", "small"), ObjectSpec("blue", "square"))),
    PromptSpec("position", (ObjectSpec("red", "circle"), ObjectSpec("blue", "square")), relation="near"),
    PromptSpec("single", (ObjectSpec("red", "circle"),), count=2),
    PromptSpec("drawing", (ObjectSpec("red", "circle"),)),
])
def test_format_rejects_specs_outside_the_grammar(spec):
    with pytest.raises(ValueError):
        format_caption(spec)


def test_all_captions_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        all_captions("drawing")


def test_contradicting_captions_are_false_of_every_scene_drawn_for_the_caption():
    from brushwork.data.shapes import generate_scenes
    from brushwork.eval.checker import check_objects

    scenes = list(generate_scenes(400, seed=3))
    assert {scene.task for scene in scenes} == {"single", "counting", "two_objects", "position"}
    for scene in scenes:
        assert check_objects(scene.objects, parse_caption(scene.caption)).ok
        near_misses = contradicting_captions(scene.caption)
        assert near_misses and scene.caption not in near_misses
        for caption in near_misses:
            assert not check_objects(scene.objects, parse_caption(caption)).ok, (scene.caption, caption)


def test_contradicting_captions_change_one_word_and_leave_out_what_is_still_true():
    assert contradicting_captions("a blue square") == [
        "a blue circle", "a blue triangle", "a green square", "a orange square", "a purple square", "a red square",
        "a yellow square"]
    small = contradicting_captions("a small red triangle")
    assert "a large red triangle" in small and "a red triangle" not in small  # a small one is still a red one
    position = contradicting_captions("a blue triangle left of a orange square")
    assert {"a blue triangle right of a orange square", "a orange square left of a blue triangle"} <= set(position)
    assert "a blue triangle and a orange square" not in position
    assert "a orange square right of a blue triangle" not in position  # the converse: the same scene
    both = contradicting_captions("a yellow square and a purple triangle")
    assert "a purple triangle and a yellow square" not in both  # the same scene, said the other way round
    assert "a purple square and a purple triangle" not in both  # outside the grammar: two colours differ
    assert {"two green squares", "four green squares"} <= set(contradicting_captions("three green squares"))
    assert contradicting_captions("a photo of a cat") == []


def test_contradictions_by_kind_group_the_near_misses_by_what_changed():
    kinds = contradictions_by_kind("a small red triangle")
    assert kinds == {"shape": ["a small red circle", "a small red square"],
                     "color": [f"a small {c} triangle" for c in ("blue", "green", "orange", "purple", "yellow")],
                     "size": ["a large red triangle"]}
    assert set(contradictions_by_kind("two red circles")) == {"shape", "color", "count"}
    assert contradictions_by_kind("a red circle above a blue square")["relation"] == [  # all but the converse
        "a blue square above a red circle", "a blue square left of a red circle", "a blue square right of a red circle",
        "a red circle below a blue square", "a red circle left of a blue square", "a red circle right of a blue square"]
    for caption in ("a blue square", "three green squares", "a yellow square and a purple triangle"):
        assert sorted(c for group in contradictions_by_kind(caption).values() for c in group) == (
            contradicting_captions(caption))
    assert contradictions_by_kind("a photo of a cat") == {}


def test_relation_near_misses_split_into_direction_and_axis():
    kinds = contradictions_by_direction_and_axis("a red circle left of a blue square")
    assert kinds["direction"] == ["a blue square left of a red circle", "a red circle right of a blue square"]
    assert kinds["axis"] == ["a blue square above a red circle", "a blue square below a red circle",
                             "a red circle above a blue square", "a red circle below a blue square"]
    assert "relation" not in kinds
    assert sorted(kinds["direction"] + kinds["axis"]) == contradictions_by_kind(
        "a red circle left of a blue square")["relation"]
    assert contradictions_by_direction_and_axis("two red circles") == contradictions_by_kind("two red circles")
    assert contradictions_by_direction_and_axis("a photo of a cat") == {}
