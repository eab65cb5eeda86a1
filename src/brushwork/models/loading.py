"""Loading a component's weights so that none is left as it was initialised.

transformers and diffusers load a file whose keys do not fit the model with a warning only, leaving those
parameters random (a text encoder saved without the `text_model.` prefix does this under some transformers
versions). Here any missing, unexpected or mis-shaped key stops the load with a BrushworkError.
"""

from pathlib import Path

import torch

from brushwork.errors import BrushworkError

SHOWN_KEYS = 3


def library_versions() -> str:
    import diffusers
    import transformers
    return f"torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}"


def _keys(kind: str, keys: list) -> str:
    # mismatched keys come as (name, file shape, model shape)
    names = sorted(k[0] if isinstance(k, tuple) else str(k) for k in keys)
    more = f" and {len(names) - SHOWN_KEYS} more" if len(names) > SHOWN_KEYS else ""
    return f"{len(names)} {kind} ({', '.join(names[:SHOWN_KEYS])}{more})"


def check_loaded(component: str, source: Path, missing=(), unexpected=(), mismatched=()) -> None:
    """Raise when any key of `component` (loaded from `source`) was missing, unexpected or of the wrong shape."""
    problems = [_keys(kind, list(keys)) for kind, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong-shape", mismatched)) if keys]
    if problems:
        raise BrushworkError(f"the {component} in {source} does not fit its model, so some of its weights would be "
                             f"random. Keys: {'; '.join(problems)} (with {library_versions()}). Install the library "
                             "versions that wrote it, or re-save it in a layout these versions read.")


def load_pretrained(component: str, cls, folder: Path, **kwargs):
    """cls.from_pretrained(folder) for a transformers or diffusers model class, checked by check_loaded."""
    model, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    check_loaded(component, folder, info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                 info.get("mismatched_keys", ()))
    return model


def load_state(component: str, module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """module.load_state_dict(state), checked by check_loaded (load_state_dict stops at the first kind of
    problem and does not list shapes as keys)."""
    expected = module.state_dict()
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    check_loaded(component, source, sorted(set(expected) - set(state)), sorted(set(state) - set(expected)), wrong)
    module.load_state_dict(state)
