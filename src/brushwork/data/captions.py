"""The caption grammar of the shapes data set.

Every caption is lower case and has one of these forms:

    single       a [small|large] {color} {shape}
    counting     two|three|four {color} {shape}s
    two_objects  a {color} {shape} and a {color} {shape}            (two different colours)
    position     a {color} {shape} left of|right of|above|below a {color} {shape}   (two different colours)

`parse_caption` turns a caption into a `PromptSpec` (what an image must hold), `format_caption` is its
inverse, `all_captions` enumerates the grammar and `contradicting_captions` lists the captions that are surely
false of an image made for a caption (one word changed). The vocabulary lives here; the palette (RGB fills)
lives in `brushwork.data.shapes`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from brushwork.errors import BrushworkError

COLOR_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TASKS: tuple[str, ...] = ("single", "two_objects", "counting", "position")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# "B right of A" says what "A left of B" says; with the objects kept, it is the opposite relation.
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
AXIS = {"left of": "horizontal", "right of": "horizontal", "above": "vertical", "below": "vertical"}
COUNT_WORDS: dict[str, int] = {"two": 2, "three": 3, "four": 4}


@dataclass(frozen=True)
class ObjectSpec:
    color: str
    shape: str
    size: str | None = None  # "small" | "large" | None; only single-object captions carry a size


@dataclass(frozen=True)
class PromptSpec:
    """What an image must hold. `count` is how many copies of objects[0] a counting prompt asks for;
    it is 1 for every other task. For two_objects and position, objects is (A, B) in caption order and
    `relation` says where A lies relative to B."""

    task: str
    objects: tuple[ObjectSpec, ...]
    count: int = 1
    relation: str | None = None


def _read_word(tokens: list[str], i: int, choices: tuple[str, ...], what: str, text: str) -> str:
    if i >= len(tokens):
        raise ValueError(f"caption {text!r} ends early: expected a {what} ({', '.join(choices)})")
    if tokens[i] not in choices:
        raise ValueError(f"unknown {what} {tokens[i]!r} in caption {text!r}; expected one of: {', '.join(choices)}")
    return tokens[i]


def _read_object(tokens: list[str], i: int, allow_size: bool, text: str) -> tuple[ObjectSpec, int]:
    """Reads `a [size] {color} {shape}` starting at tokens[i]; returns the spec and the next index."""
    _read_word(tokens, i, ("a",), "article", text)
    i += 1
    size = None
    if allow_size and i < len(tokens) and tokens[i] in SIZES:
        size = tokens[i]
        i += 1
    color = _read_word(tokens, i, COLOR_NAMES, "colour", text)
    shape = _read_word(tokens, i + 1, SHAPES, "shape", text)
    return ObjectSpec(color, shape, size), i + 2


def parse_caption(text: str) -> PromptSpec:
    """Parses a caption of the shapes grammar (case and repeated spaces are ignored).

    Raises ValueError naming the problem if the text is not in the grammar."""
    tokens = text.lower().split()
    if not tokens:
        raise ValueError("caption is empty")

    if tokens[0] in COUNT_WORDS:
        if len(tokens) != 3:
            raise ValueError(f"counting caption {text!r} must read '<two|three|four> <colour> <shape>s'")
        color = _read_word(tokens, 1, COLOR_NAMES, "colour", text)
        plural = tokens[2]
        if not plural.endswith("s") or plural[:-1] not in SHAPES:
            raise ValueError(f"unknown plural shape {plural!r} in caption {text!r}; expected one of: "
                             + ", ".join(s + "s" for s in SHAPES))
        return PromptSpec("counting", (ObjectSpec(color, plural[:-1]),), count=COUNT_WORDS[tokens[0]])

    first, i = _read_object(tokens, 0, allow_size=True, text=text)
    if i == len(tokens):
        return PromptSpec("single", (first,))
    if first.size is not None:
        raise ValueError(f"caption {text!r}: a size (small/large) is only allowed in single-object captions")

    if tokens[i] == "and":
        task, relation, i = "two_objects", None, i + 1
    elif tokens[i] in ("above", "below"):
        task, relation, i = "position", tokens[i], i + 1
    elif tokens[i] in ("left", "right") and i + 1 < len(tokens) and tokens[i + 1] == "of":
        task, relation, i = "position", f"{tokens[i]} of", i + 2
    else:
        raise ValueError(f"caption {text!r}: expected 'and', 'left of', 'right of', 'above' or 'below' "
                         f"after the first object, got {' '.join(tokens[i:])!r}")

    second, i = _read_object(tokens, i, allow_size=False, text=text)
    if i != len(tokens):
        raise ValueError(f"caption {text!r} has extra words at the end: {' '.join(tokens[i:])!r}")
    if first.color == second.color:
        raise ValueError(f"caption {text!r}: the two objects must have different colours")
    return PromptSpec(task, (first, second), relation=relation)


def _object_phrase(obj: ObjectSpec) -> str:
    return " ".join(w for w in ("a", obj.size, obj.color, obj.shape) if w)


def format_caption(spec: PromptSpec) -> str:
    """The caption of a spec; the inverse of parse_caption. Raises ValueError for a spec outside the grammar."""
    if spec.task == "single" and len(spec.objects) == 1:
        caption = _object_phrase(spec.objects[0])
    elif spec.task == "counting" and len(spec.objects) == 1 and spec.count in COUNT_WORDS.values():
        word = next(w for w, n in COUNT_WORDS.items() if n == spec.count)
        caption = f"{word} {spec.objects[0].color} {spec.objects[0].shape}s"
    elif spec.task == "two_objects" and len(spec.objects) == 2:
        caption = f"{_object_phrase(spec.objects[0])} and {_object_phrase(spec.objects[1])}"
    elif spec.task == "position" and len(spec.objects) == 2 and spec.relation in RELATIONS:
        caption = f"{_object_phrase(spec.objects[0])} {spec.relation} {_object_phrase(spec.objects[1])}"
    else:
        raise ValueError(f"spec is not in the caption grammar: {spec}")
    if parse_caption(caption) != spec:
        raise ValueError(f"spec is not in the caption grammar: {spec}")
    return caption


def all_specs(task: str | None = None) -> list[PromptSpec]:
    """Every PromptSpec of the grammar (for one task, or all tasks)."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of: {', '.join(TASKS)}")
    pairs = [(c, s) for c in COLOR_NAMES for s in SHAPES]
    specs = []
    if task in (None, "single"):
        specs += [PromptSpec("single", (ObjectSpec(c, s, size),)) for c, s in pairs for size in (None, *SIZES)]
    if task in (None, "counting"):
        specs += [PromptSpec("counting", (ObjectSpec(c, s),), count=n) for c, s in pairs for n in COUNT_WORDS.values()]
    two = [(ObjectSpec(*a), ObjectSpec(*b)) for a, b in itertools.permutations(pairs, 2) if a[0] != b[0]]
    if task in (None, "two_objects"):
        specs += [PromptSpec("two_objects", objects) for objects in two]
    if task in (None, "position"):
        specs += [PromptSpec("position", objects, relation=rel) for objects in two for rel in RELATIONS]
    return specs


def all_captions(task: str | None = None) -> list[str]:
    """Every caption of the grammar (for one task, or all tasks), sorted."""
    return sorted(format_caption(spec) for spec in all_specs(task))


def _replace_object(spec: PromptSpec, index: int, **changes: str) -> PromptSpec:
    objects = list(spec.objects)
    objects[index] = dataclasses.replace(objects[index], **changes)
    return dataclasses.replace(spec, objects=tuple(objects))


def contradicting_captions(text: str) -> list[str]:
    """Captions of the grammar that no image true to `text` can satisfy: one object's shape or colour changed,
    the size flipped (small <-> large), another count, another relation, or the objects swapped under any relation
    but the converse. Sorted; empty for a caption outside the grammar. "a red square" and "a small red square" do
    not contradict each other (a small red square is a red square), nor do "A and B" and "B and A", nor "A above B"
    and "B below A", so none of them is listed."""
    return sorted({caption for captions in contradictions_by_kind(text).values() for caption in captions})


def has_near_misses(captions: Iterable[str], sample: int = 64) -> bool:
    """Whether near misses can be made for these captions: some of the first `sample` are in the grammar."""
    return any(map(contradicting_captions, itertools.islice(captions, sample)))


def require_near_misses(captions: Iterable[str], option: str, data_name: str, sample: int = 64) -> None:
    """Raises unless near misses can be made for these captions (has_near_misses)."""
    if not has_near_misses(captions, sample):
        raise BrushworkError(f"{option} changes one word of captions in the shapes grammar (\"a blue circle\" for "
                             f"\"a blue square\"); the captions of {data_name} are not in it. Leave it at 0.")


def contradictions_by_kind(text: str) -> dict[str, list[str]]:
    """contradicting_captions grouped by what changed: "shape", "color", "size", "count", "relation" (another
    relation, or the objects swapped under any relation but the converse); kinds with no caption are left out."""
    try:
        spec = parse_caption(text)
    except ValueError:
        return {}
    kinds: dict[str, list[PromptSpec]] = {"shape": [], "color": [], "size": [], "count": [], "relation": []}
    for index, obj in enumerate(spec.objects):
        taken = {o.color for i, o in enumerate(spec.objects) if i != index}  # two objects keep distinct colours
        kinds["shape"] += [_replace_object(spec, index, shape=shape) for shape in SHAPES if shape != obj.shape]
        kinds["color"] += [_replace_object(spec, index, color=color) for color in COLOR_NAMES
                           if color != obj.color and color not in taken]
        if obj.size is not None:
            kinds["size"].append(_replace_object(spec, index, size=next(s for s in SIZES if s != obj.size)))
    if spec.task == "counting":
        kinds["count"] = [dataclasses.replace(spec, count=n) for n in COUNT_WORDS.values() if n != spec.count]
    if spec.task == "position":
        # A relation holds only along its dominant axis (relation_holds), so "A left of B" is false of a scene
        # where "A above B" holds, not only "A below B".
        kinds["relation"] = [dataclasses.replace(spec, relation=relation) for relation in RELATIONS
                             if relation != spec.relation]
        kinds["relation"] += [dataclasses.replace(spec, objects=spec.objects[::-1], relation=relation)
                              for relation in RELATIONS if relation != CONVERSE[spec.relation]]
    grouped = {kind: sorted({format_caption(c) for c in specs} - {text}) for kind, specs in kinds.items()}
    return {kind: captions for kind, captions in grouped.items() if captions}


def contradictions_by_direction_and_axis(text: str) -> dict[str, list[str]]:
    """contradictions_by_kind with its "relation" near misses split in two: "direction" (the relation's axis kept:
    the opposite relation, or the objects swapped; two captions) and "axis" (a perpendicular relation, in either
    order; four). Drawn one per kind, the word's direction and the objects' order are then contrasted as often as
    its axis, where drawing from all six contrasts the axis two times in three."""
    kinds = contradictions_by_kind(text)
    relation = kinds.pop("relation", None)
    if relation:
        axis = AXIS[parse_caption(text).relation]
        kinds["direction"] = [c for c in relation if AXIS[parse_caption(c).relation] == axis]
        kinds["axis"] = [c for c in relation if AXIS[parse_caption(c).relation] != axis]
    return kinds
