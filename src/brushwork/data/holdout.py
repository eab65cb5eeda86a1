"""Hold-outs: combinations of the shapes grammar left out of the training data, to test whether a model composes
what it never saw (`brushwork data shapes --hold-out ...`).

A hold-out is a comma-separated list of patterns; a caption is held out when any pattern matches it:

    purple triangle          any caption with a purple triangle in it (single, counting, two objects, position)
    small red square         single-object captions of a small red square (only they carry a size)
    four circles             counting captions of four circles of any colour ("four red circles": red ones only)
    red square left of *     position captions that put a red square left of anything, in either wording
                             ("a blue circle right of a red square" says the same, so it is held out too)
    red square and circle    two-object scenes (two_objects or position) holding both, in either order

An object is `*` or one to three words (a size, a colour, a shape; plurals read as singular). The patterns are
checked against the grammar: a word outside it, a pattern that matches no caption, or a hold-out that leaves a
task with no caption at all is a BrushworkError naming it.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from brushwork.data.captions import (COLOR_NAMES, CONVERSE, COUNT_WORDS, RELATIONS, SHAPES, SIZES, TASKS,
                                     ObjectSpec, PromptSpec, all_specs, format_caption, parse_caption)
from brushwork.errors import BrushworkError

HOLD_OUT_FILE = "hold_out.json"   # beside metadata.jsonl (or the shards) of a data set written with a hold-out
JOINERS = ("and", *RELATIONS)


@dataclass(frozen=True)
class ObjectPattern:
    """What an object must be; None matches anything."""

    color: str | None = None
    shape: str | None = None
    size: str | None = None

    def matches(self, obj: ObjectSpec) -> bool:
        return all(want is None or want == have
                   for want, have in ((self.color, obj.color), (self.shape, obj.shape), (self.size, obj.size)))


@dataclass(frozen=True)
class Pattern:
    """One pattern of a hold-out: an object, a count of objects, or two objects joined by "and" or a relation."""

    text: str
    objects: tuple[ObjectPattern, ...]
    count: int | None = None
    joiner: str | None = None

    def matches(self, spec: PromptSpec) -> bool:
        if self.count is not None:
            return spec.task == "counting" and spec.count == self.count and self.objects[0].matches(spec.objects[0])
        if self.joiner is None:
            return any(self.objects[0].matches(obj) for obj in spec.objects)
        if len(spec.objects) != 2:
            return False
        first, second = self.objects
        in_order = first.matches(spec.objects[0]) and second.matches(spec.objects[1])
        swapped = first.matches(spec.objects[1]) and second.matches(spec.objects[0])
        if self.joiner == "and":
            return in_order or swapped
        return spec.task == "position" and ((spec.relation == self.joiner and in_order)
                                            or (spec.relation == CONVERSE[self.joiner] and swapped))


def _vocabulary() -> str:
    return f"colours: {', '.join(COLOR_NAMES)}; shapes: {', '.join(SHAPES)}; sizes: {', '.join(SIZES)}"


def _read_object(words: list[str], pattern: str) -> ObjectPattern:
    if words == ["*"]:
        return ObjectPattern()
    if words[:1] == ["a"]:
        words = words[1:]
    if not words:
        raise BrushworkError(f"hold-out {pattern!r}: an object is missing; write '*' for any object")
    found: dict[str, str] = {}
    for position, word in enumerate(words):
        singular = word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word
        kind = ("color" if singular in COLOR_NAMES else "shape" if singular in SHAPES
                else "size" if singular in SIZES else None)
        if kind is None:
            if len(words) == 1:
                what = "colour or shape"
            else:
                what = "shape" if position == len(words) - 1 else "colour"
            raise BrushworkError(f"hold-out {pattern!r}: unknown {what} {word!r} ({_vocabulary()})")
        if kind in found:
            raise BrushworkError(f"hold-out {pattern!r}: two {kind}s ({found[kind]!r} and {singular!r}) in one object")
        found[kind] = singular
    return ObjectPattern(**found)


def _split_joiner(words: list[str]) -> tuple[list[str], str | None, list[str]]:
    """The words before a joiner ("and", "left of", ...), the joiner, the words after; no joiner: (words, None, [])."""
    for i, word in enumerate(words):
        if word in ("and", "above", "below"):
            return words[:i], word, words[i + 1:]
        if word in ("left", "right") and words[i + 1:i + 2] == ["of"]:
            return words[:i], f"{word} of", words[i + 2:]
    return words, None, []


def parse_pattern(text: str) -> Pattern:
    words = text.lower().split()
    pattern = " ".join(words)
    if not words:
        raise BrushworkError("hold-out: an empty pattern (two commas in a row?)")
    if words[0] in COUNT_WORDS:
        if any(word in JOINERS or word in ("left", "right") for word in words):
            raise BrushworkError(f"hold-out {pattern!r}: a count takes one kind of object, e.g. 'four circles'")
        return Pattern(pattern, (_read_object(words[1:], pattern),), count=COUNT_WORDS[words[0]])
    before, joiner, after = _split_joiner(words)
    if joiner is None:
        if words == ["*"]:
            raise BrushworkError("hold-out '*' would hold out every image")
        return Pattern(pattern, (_read_object(words, pattern),))
    return Pattern(pattern, (_read_object(before, pattern), _read_object(after, pattern)), joiner=joiner)


class HoldOut:
    """The patterns of a hold-out, checked against the grammar; `covers` tells a held-out caption."""

    def __init__(self, patterns: list[str]):
        self.patterns = [parse_pattern(text) for text in patterns]
        specs = all_specs()
        for pattern in self.patterns:
            if not any(pattern.matches(spec) for spec in specs):
                raise BrushworkError(f"hold-out {pattern.text!r} matches no caption of the shapes grammar (sizes "
                                     "appear only in single-object captions, relations only between two objects)")
        for task in TASKS:
            if all(self.covers_spec(spec) for spec in all_specs(task)):
                raise BrushworkError(f"hold-out {', '.join(self.texts)!r} leaves the {task} task no caption to "
                                     "train on: hold out less of it")

    @classmethod
    def parse(cls, text: str) -> "HoldOut":
        """"purple triangle,four circles" -> HoldOut."""
        return cls(text.split(","))

    @property
    def texts(self) -> list[str]:
        return [pattern.text for pattern in self.patterns]

    def covers_spec(self, spec: PromptSpec) -> bool:
        return any(pattern.matches(spec) for pattern in self.patterns)

    def covers(self, caption: str) -> bool:
        """Whether a caption is held out; a caption outside the grammar never is."""
        try:
            return self.covers_spec(parse_caption(caption))
        except ValueError:
            return False

    def captions(self, task: str | None = None) -> list[str]:
        """The held-out captions of the grammar (of one task, or all), sorted."""
        return sorted(format_caption(spec) for spec in all_specs(task) if self.covers_spec(spec))


def write_hold_out(hold_out: HoldOut) -> str:
    """The text of HOLD_OUT_FILE."""
    return json.dumps({"hold_out": hold_out.texts}, indent=2) + "\n"


def read_hold_out(folder: Path) -> list[str] | None:
    """The hold-out patterns recorded in a data set folder, or None when it has none."""
    path = Path(folder) / HOLD_OUT_FILE
    if not path.is_file():
        return None
    return list(json.loads(path.read_text())["hold_out"])
