"""`brushwork eval`'s creativity: what a model was trained on, its hold-out, the held-out prompts it is asked for,
and faithfulness on seen against held-out combinations (compositional generalisation, Okawa et al. 2023).
The near-copy search is `memorisation.py`'s."""

import json
import random
from pathlib import Path

from brushwork.data.captions import parse_caption
from brushwork.data.dataset import SHAPES_DEFAULT_N, ImageTextDataset, open_dataset
from brushwork.data.holdout import HoldOut
from brushwork.eval import metrics

NAMES = ("shapes", "emoji")


def training_facts(model: Path) -> dict:
    """The model's training.json ({} when it has none)."""
    path = Path(model) / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def same_data(trained_on: str, data: str) -> bool:
    """Whether two --data values name the same data set (a name, or paths that resolve to one folder)."""
    if trained_on in NAMES or data in NAMES:
        return trained_on == data
    return Path(trained_on).expanduser().resolve() == Path(data).expanduser().resolve()


def data_mismatch(name: str, facts: dict, data: str) -> str | None:
    """The warning for a model evaluated against another data set than it was trained on."""
    trained_on = facts.get("data")
    if trained_on is None or same_data(trained_on, data):
        return None
    return (f"{name} was trained on {trained_on!r} but is evaluated against {data!r}: its copy rate and nearest "
            "training images are measured against a data set it did not learn from.")


def model_hold_out(facts: dict) -> HoldOut | None:
    """The hold-out the model's training data was written with (training.json's data_report), if any."""
    texts = (facts.get("data_report") or {}).get("hold_out")
    return HoldOut(texts) if texts else None


def grammar_tasks(prompts: list[str]) -> list[str] | None:
    """Each prompt's shapes task, or None unless every prompt is in the grammar (a shapes data folder)."""
    try:
        return [parse_caption(prompt).task for prompt in prompts]
    except ValueError:
        return None


def held_out_prompts(hold_outs: list[HoldOut], prompts: list[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    """Prompts the models' hold-outs cover, beyond `prompts`: per task, enough to make up n held-out ones."""
    extra, tasks = [], []
    covered = set().union(*(hold_out.captions() for hold_out in hold_outs))
    for task in dict.fromkeys(parse_caption(caption).task for caption in sorted(covered)):
        have = sum(1 for prompt in prompts if prompt in covered and parse_caption(prompt).task == task)
        choices = sorted(c for c in covered if parse_caption(c).task == task and c not in prompts)
        chosen = random.Random(f"{seed}-held-out-{task}").sample(choices, max(0, min(n - have, len(choices))))
        extra += chosen
        tasks += [task] * len(chosen)
    return extra, tasks


def accuracy(hits: list[bool]) -> dict:
    """Share of hits with its 95% Wilson interval and count."""
    low, high = metrics.wilson_interval(sum(hits), len(hits))
    return {"accuracy": sum(hits) / len(hits) if hits else 0.0, "low": low, "high": high, "n": len(hits)}


def compositions(hold_out: HoldOut, prompts: list[str], tasks: list[str], passed: list[bool]) -> dict:
    """Faithfulness per task (and overall) on seen prompts against held-out ones; prompts, tasks and passed are
    per image. Tasks without a held-out image are left out."""
    held = [hold_out.covers(prompt) for prompt in prompts]
    result = {}
    for task in [*dict.fromkeys(tasks), "overall"]:
        mine = [i for i, t in enumerate(tasks) if task in (t, "overall")]
        unseen = [passed[i] for i in mine if held[i]]
        if unseen:
            result[task] = {"seen": accuracy([passed[i] for i in mine if not held[i]]), "held_out": accuracy(unseen)}
    return result


def training_data(data: str, facts: dict, resolution: int, limit: int | None) -> ImageTextDataset:
    """The data set the copies are searched in: `data` (its first `limit` items). For `shapes`, the draw the model
    trained on when its training.json says so (its n, seed and task weights; models from before the weights were
    recorded drew the tasks equally), else the default number of scenes of the equal draw (seed 0)."""
    if data != "shapes":
        return open_dataset(data, resolution, n=limit)
    if facts.get("data") != "shapes":
        return open_dataset("shapes", resolution, n=limit or SHAPES_DEFAULT_N, shapes_tasks=None)
    tasks = (facts.get("data_report") or {}).get("shapes_tasks")
    return open_dataset("shapes", resolution, n=limit or facts.get("n") or SHAPES_DEFAULT_N, seed=facts.get("seed", 0),
                        shapes_tasks=tasks)
