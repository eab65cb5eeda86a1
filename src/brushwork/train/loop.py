"""The one training loop every stage uses (CLIP, VAE, UNet, a GAN later), built on `accelerate`.

A stage says *what* to train (modules, data, loss); `run` does the rest: precision, gradient accumulation,
DDP, checkpoints with exact resume, EMA, NaN stop, logs, progress bar and validation samples.

Step numbering: "step s" means s optimizer steps are done. Checkpoint `step-00000100` holds the state after
100 steps; log record `{"step": 100, ...}` averages the losses of steps 91..100 (with log_every=10).

Data order: epoch e is a permutation of the data set seeded from (seed, e); the epochs are concatenated and
optimizer step s (0-based) consumes the global sample positions [s*B, (s+1)*B), B = batch_size. Process r of
N takes the contiguous share [s*B + r*B/N, s*B + (r+1)*B/N), split into grad_accum micro-batches. So the
data position is a function of the step alone, and N processes see the same samples as one process that
accumulates N times as many micro-batches. Before an item is fetched, the global RNGs (torch CPU, numpy,
random) are seeded from (seed, sample position), so random augmentations inside the data set repeat
exactly on resume, in any number of processes and data loader workers.

Randomness inside `Stage.loss`: the `generator` argument (on the training device) and the global torch RNG
(dropout) are both seeded, before every loss call, from (seed, step, process rank, micro-step, optimizer
index). Draw noise/timesteps/caption dropout from `generator`: a resumed run then repeats them exactly.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import broadcast, is_bf16_available, send_to_device
from diffusers.optimization import get_scheduler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from brushwork.errors import BrushworkError
from brushwork.hardware import cpu_has_native_bf16

CHECKPOINT_FORMAT = 1
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")
_TEMP_PREFIX = ".tmp-"
PRECISIONS = ("no", "bf16", "fp16", "auto")
# diffusers.optimization.get_scheduler's schedules (as its training scripts' --lr_scheduler), less
# piecewise_constant, which needs rules of its own
LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
REFIT_LOGS = 20   # log steps between two fits of the lr schedule to a time budget
# Without a terminal (a log file, nohup, CI) the progress bar does not draw: a plain line this often instead.
PLAIN_PROGRESS_S = 60.0
REPORT_TO = {"none": (), "tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb")}


@dataclass
class TrainConfig:
    out_dir: Path  # checkpoints/, log.jsonl, samples/ go here
    max_steps: int
    batch_size: int = 64  # GLOBAL batch per optimizer step (all processes, all accum steps)
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # When set, the warm-up is this share of the lr schedule's length, at most warmup_steps: a schedule that a
    # time budget shortens keeps its proportions instead of ending inside its warm-up.
    warmup_share: float | None = None
    lr_schedule: str = "constant"  # one of LR_SCHEDULES ("constant" takes no warm-up: "constant_with_warmup" does)
    mixed_precision: str = "auto"  # "no" | "bf16" | "fp16" | "auto" (bf16 where the hardware has it)
    ema_decay: float | None = None
    grad_clip: float | None = 1.0
    checkpoint_every: int = 500  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0  # 0: never
    seed: int = 0
    resume: bool = False  # continue from the newest checkpoint in out_dir; none there: start at step 0
    resume_from: Path | None = None  # continue from this checkpoint (later ones in out_dir are replaced)
    num_workers: int = 0  # DataLoader worker processes per training process
    # With either time budget, the lr schedule ends where the budget is expected to: at the first log step after
    # 2 * log_every steps, every REFIT_LOGS log steps after, and at the schedule's end, the steps the time left
    # allows at this run's speed so far set the schedule's end (at most max_steps; before the end, moved only
    # when it changes by 5% or more), so a cosine decays within the budget, a run that speeds up (a machine that
    # frees up) is not left at lr 0, and one that reaches its end early does not climb the cosine's next cycle.
    # A resumed run estimates again for its own budget.
    max_minutes: float | None = None  # stop (checkpoint, return) at the first log step after this much training
    stop_at: float | None = None  # the same at this time.time(): a budget that several runs share (the recipe's)
    report_to: str = "none"  # also log to "tensorboard", "wandb", "all" of them or "none" (log.jsonl is always written)
    compile: bool = False  # train through torch.compile (inductor): faster steps after a compile of minutes


class Stage(Protocol):
    name: str

    def modules(self) -> dict[str, nn.Module]: ...  # trainable modules (checkpointed, EMA'd); same objects each call
    def dataset(self) -> Dataset: ...
    def collate(self, items: list[dict]) -> Any: ...
    def optimizers(self) -> dict[str, list[str]]: ...  # optimizer name -> module names, stepped in this order
    def optimizer_options(self) -> dict[str, dict]: ...  # optimizer name -> AdamW overrides (+ "lr_scale")
    def loss(
        self, optimizer: str, modules: dict[str, nn.Module], batch: Any, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]: ...
    def fingerprint(self) -> dict: ...
    def sample(self, modules: dict[str, nn.Module], step: int) -> Any: ...  # PIL image or None
    def after_step(self, step: int) -> None: ...  # after optimizer step `step` (1-based), before the EMA update


def _close_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class BaseStage(abc.ABC):
    """Defaults for a Stage. Contract for `loss`:

    - Call modules as `modules[name](...)` (their forward). Under DDP they are DistributedDataParallel wrappers,
      which synchronise gradients only for work done through forward; other methods are not reachable.
    - With several optimizers, the modules of the optimizer being stepped are wrapped; the others are passed
      plain (their gradients from this loss are discarded), so e.g. a GAN's D step may run G under no_grad.
    - Return (scalar mean loss, metrics); metric values may be floats or 0-dim tensors (tensors avoid a device
      sync; they are averaged over the log interval and over processes).
    - Set `find_unused_parameters = True` if some parameters of a module get no gradient from the loss.
    """

    name: str = "stage"
    find_unused_parameters: bool = False

    @abc.abstractmethod
    def modules(self) -> dict[str, nn.Module]: ...

    @abc.abstractmethod
    def dataset(self) -> Dataset: ...

    @abc.abstractmethod
    def loss(
        self, optimizer: str, modules: dict[str, nn.Module], batch: Any, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    @abc.abstractmethod
    def fingerprint(self) -> dict: ...

    def collate(self, items: list[dict]) -> Any:
        return default_collate(items)

    def optimizers(self) -> dict[str, list[str]]:
        return {"main": list(self.modules())}

    def optimizer_options(self) -> dict[str, dict]:
        """Per optimizer name, AdamW keyword overrides, e.g. {"d": {"betas": (0.0, 0.99), "lr_scale": 4.0}}
        ("lr_scale" multiplies the config's lr)."""
        return {}

    def sample(self, modules: dict[str, nn.Module], step: int) -> Any:
        return None

    def after_step(self, step: int) -> None:
        """Called after optimizer step number `step` (1-based) in every process, e.g. to move a target network that
        a module holds (it is checkpointed with the module, so a resumed run goes on exactly)."""


@dataclass
class TrainResult:
    step: int
    modules: dict[str, nn.Module]
    ema: dict[str, nn.Module] | None
    log_path: Path
    checkpoint: Path | None


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that depends on every part (ints/strings), stable across runs and machines."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this process's micro-batches of (global sample position, data set index), from `start_step` on."""

    def __init__(self, num_items: int, batch_size: int, grad_accum: int, rank: int, world_size: int,
                 seed: int, start_step: int, max_steps: int):
        self.num_items, self.batch_size, self.grad_accum = num_items, batch_size, grad_accum
        self.rank, self.per_process = rank, batch_size // world_size
        self.micro_size = self.per_process // grad_accum
        self.seed, self.start_step, self.max_steps = seed, start_step, max_steps
        self._epoch, self._perm = -1, []

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_items)
        if epoch != self._epoch:
            order = torch.Generator().manual_seed(derive_seed("epoch", self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=order).tolist()
        return self._perm[offset]

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            first = step * self.batch_size + self.rank * self.per_process
            for micro in range(self.grad_accum):
                start = first + micro * self.micro_size
                yield [(p, self.index(p)) for p in range(start, start + self.micro_size)]

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.grad_accum


class PositionSeededDataset(Dataset):
    """Seeds the global RNGs from (seed, sample position) before fetching each item (exact augmentations)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        position, index = key
        seed = derive_seed("item", self.seed, position)
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.dataset[index]


class EMA:
    """Exponential moving average of a module's weights, kept as a module copy.

    Own code rather than diffusers' EMAModel: EMAModel keeps a flat list of tensors, so samples, checkpoints
    (safetensors) and TrainResult.ema would each need an extra module copy plus copy_to calls. Decay warmup
    min(decay, (1 + t) / (10 + t)) as in EMAModel, with t = steps done - 1, so it depends on the step alone.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self._pairs = (list(self.module.parameters()), list(module.parameters()))
        self._buffers = list(zip(self.module.buffers(), module.buffers()))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step number `step` (1-based)."""
        t = step - 1
        decay = min(self.decay, (1 + t) / (10 + t))
        torch._foreach_lerp_(*self._pairs, 1.0 - decay)
        for ema_buffer, buffer in self._buffers:
            ema_buffer.copy_(buffer)


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in out_dir/checkpoints, oldest first (temp folders of interrupted saves ignored)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _CHECKPOINT_NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_CHECKPOINT_NAME.match(p.name).group(1)))


def checkpoint_folders(out_dir: Path) -> list[Path]:
    """Every step-* folder in out_dir/checkpoints, oldest first, intact or not (a save writes a temp folder and
    renames it into place, so a damaged one was damaged after it was written)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _CHECKPOINT_NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=_checkpoint_step)


def _checkpoint_step(checkpoint: Path) -> int:
    return int(_CHECKPOINT_NAME.match(checkpoint.name).group(1))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def checkpoint_problem(checkpoint: Path, module_names: list[str], ema: bool) -> tuple[str | None, dict | None]:
    """(what is wrong with the checkpoint, None) or (None, its training state loaded as the loop loads it).
    Weights files are checked by their safetensors header, which must cover the whole file (cheap)."""
    try:
        state = json.loads((checkpoint / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return "state.json has no step", None
    except FileNotFoundError:
        return "state.json is missing", None
    except (OSError, ValueError) as e:
        return f"state.json is unreadable ({_first_line(e)})", None
    names = list(module_names) + ([f"ema-{name}" for name in module_names] if ema else [])
    for name in names:
        path = checkpoint / f"{name}.safetensors"
        if not path.is_file():
            return f"{path.name} is missing", None
        if path.stat().st_size == 0:
            return f"{path.name} is empty", None
        try:
            with safe_open(path, "pt"):
                pass
        except Exception as e:  # safetensors raises its own error type
            return f"{path.name} is unreadable ({_first_line(e)})", None
    try:
        training = torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return "training_state.pt is missing", None
    except Exception as e:  # a truncated zip raises RuntimeError; other damage other types
        return f"training_state.pt is unreadable ({_first_line(e)})", None
    if not isinstance(training, dict) or not {"optimizers", "schedulers", "rng"} <= set(training):
        return "training_state.pt is incomplete", None
    return None, training


def _config_json(config: TrainConfig) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}


def _normalized(value: Any) -> Any:
    return _without_private_keys(json.loads(json.dumps(value, sort_keys=True, default=str)))


def _without_private_keys(value: Any) -> Any:
    # diffusers configs carry `_use_default_values`, a list built from a set: its order changes from one
    # process to the next (string hashing), so it must not take part in comparing fingerprints.
    if isinstance(value, dict):
        return {k: _without_private_keys(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_without_private_keys(v) for v in value]
    return value


def _fsync(path: Path) -> None:
    if path.is_dir() and os.name == "nt":
        return  # Windows cannot open folders for fsync
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _log_step(line: str) -> float:
    """Step of a log.jsonl line; inf for a line cut short by a crash, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _check_config(config: TrainConfig) -> None:
    problems = []
    if config.max_steps < 1:
        problems.append(f"max_steps must be >= 1 (got {config.max_steps})")
    if config.batch_size < 1 or config.grad_accum < 1:
        problems.append(f"batch_size and grad_accum must be >= 1 (got {config.batch_size}, {config.grad_accum})")
    if config.lr_schedule not in LR_SCHEDULES:
        problems.append(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)} (got {config.lr_schedule!r})")
    if config.mixed_precision not in PRECISIONS:
        problems.append(f"mixed_precision must be one of {list(PRECISIONS)} (got {config.mixed_precision!r})")
    if config.ema_decay is not None and not 0.0 < config.ema_decay < 1.0:
        problems.append(f"ema_decay must be between 0 and 1 (got {config.ema_decay})")
    if config.keep_checkpoints < 1:
        problems.append(f"keep_checkpoints must be >= 1 (got {config.keep_checkpoints})")
    if min(config.checkpoint_every, config.sample_every, config.warmup_steps, config.num_workers) < 0:
        problems.append("checkpoint_every, sample_every, warmup_steps and num_workers must be >= 0")
    if config.warmup_share is not None and not 0 <= config.warmup_share <= 1:
        problems.append(f"warmup_share must be between 0 and 1 (got {config.warmup_share})")
    if config.log_every < 1:
        problems.append(f"log_every must be >= 1 (got {config.log_every})")
    if config.max_minutes is not None and not config.max_minutes > 0:
        problems.append(f"max_minutes must be a positive number of minutes (got {config.max_minutes})")
    if problems:
        raise BrushworkError("Invalid training config: " + "; ".join(problems) + ".")
    check_report_to(config.report_to)


def check_report_to(report_to: str) -> None:
    """BrushworkError unless `report_to` names trackers whose packages are installed."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if report_to not in REPORT_TO:
        raise BrushworkError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}.")
    installed = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    missing = [name for name in REPORT_TO[report_to] if not installed[name]]
    if missing:
        raise BrushworkError(f"--report-to {report_to} needs {' and '.join(missing)}, which is not installed: "
                             f"pip install {' '.join(missing)}")


def _trackers(config: TrainConfig) -> list:
    """accelerate's trackers for config.report_to. TensorBoard's events go beside log.jsonl (so that `tensorboard
    --logdir` on the runs folder shows one run per stage); wandb runs offline unless WANDB_MODE says otherwise."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    out_dir = Path(config.out_dir)
    kinds = {"tensorboard": lambda: TensorBoardTracker(out_dir.name, out_dir.parent),
             "wandb": lambda: WandBTracker("brushwork", name=out_dir.name, dir=str(out_dir),
                                           mode=os.environ.get("WANDB_MODE", "offline"), config=_config_json(config))}
    return [kinds[name]() for name in REPORT_TO[config.report_to]]


def check_writable(out_dir: Path) -> None:
    """BrushworkError unless out_dir is (or can be made) a folder we can write in."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BrushworkError(f"output {out_dir} is a file, not a folder: choose a folder path.")
    probe = out_dir / f".write-test-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BrushworkError(f"Cannot write to the output folder {out_dir}: {e.strerror or e}. "
                             "Choose another out_dir or fix its permissions.") from None


def _has_gpu() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, MPS, XPU, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def process_state() -> PartialState:
    """accelerate's process state (rank, device, process group), the one way every module asks for it.

    It is a process-wide singleton set up by its first caller: without a GPU it must be told it runs on the
    CPU, or under torchrun it opens no (gloo) process group and every process trains alone."""
    return PartialState(cpu=not _has_gpu())


def resolve_precision(requested: str, device: torch.device) -> str:
    """"auto" -> "bf16" where the device computes bf16 natively, else "no"; refuses fp16 off GPU."""
    if requested == "auto":
        native = cpu_has_native_bf16() if device.type == "cpu" else device.type in ("cuda", "mps") and is_bf16_available(True)
        return "bf16" if native else "no"
    if requested == "fp16" and device.type not in ("cuda", "mps"):
        raise BrushworkError(f"mixed_precision='fp16' needs a CUDA or MPS GPU (training runs on {device.type}); "
                             "use 'bf16', 'no' or 'auto'.")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BrushworkError("This GPU has no bf16 support; use mixed_precision='fp16' or 'no'.")
    return requested


def _check_resume(checkpoint: Path, stage: Stage, config: TrainConfig) -> dict:
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise BrushworkError(f"Cannot read checkpoint {checkpoint}: {e}. Delete that folder to resume from an "
                             "older checkpoint.") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise BrushworkError(f"Checkpoint {checkpoint} has format {state.get('format')!r}; this brushwork "
                             f"reads format {CHECKPOINT_FORMAT}. Train into a new out_dir.")
    saved, current = _normalized(state["fingerprint"]), _normalized(stage.fingerprint())
    if saved != current:
        keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys)
        raise BrushworkError(f"Cannot resume from {checkpoint}: stage {stage.name!r} was configured differently "
                             f"({detail}). Use the original settings, or train into a new out_dir.")
    for field in ("batch_size", "seed"):
        if state["config"][field] != getattr(config, field):
            raise BrushworkError(f"Cannot resume from {checkpoint}: it was trained with {field}="
                                 f"{state['config'][field]}, now {field}={getattr(config, field)}. "
                                 "Use the original value (the data order depends on it), or train into a new out_dir.")
    return state


def _check_stage(modules: dict[str, nn.Module], groups: dict[str, list[str]]) -> None:
    assigned = [name for names in groups.values() for name in names]
    unknown = sorted(set(assigned) - set(modules))
    repeated = sorted({n for n in assigned if assigned.count(n) > 1})
    orphans = sorted(set(modules) - set(assigned))
    if not groups or unknown or repeated or orphans:
        raise ValueError(f"Stage.optimizers() must assign each module to exactly one optimizer "
                         f"(unknown: {unknown}, in two optimizers: {repeated}, in none: {orphans}).")


class _Trainer:
    """State of one `run` call; methods are the loop's phases (kept apart so the hot loop stays short)."""

    def __init__(self, stage: Stage, config: TrainConfig):
        self.stage, self.config = stage, config
        self.out_dir = Path(config.out_dir)
        self.checkpoint_root = self.out_dir / "checkpoints"
        self.log_path = self.out_dir / "log.jsonl"

    # ---- setup -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        stage, config = self.stage, self.config
        _check_config(config)
        check_writable(self.out_dir)
        existing = checkpoint_folders(self.out_dir)
        if existing and not config.resume and config.resume_from is None:
            raise BrushworkError(f"{self.out_dir} already holds checkpoints (newest: {existing[-1].name}). Pass "
                                 "resume=True (--resume) to continue that run, or choose another out_dir.")

        # Without a GPU, accelerate only sets up multi-process (gloo) training when told it runs on the CPU.
        use_cpu = not _has_gpu()
        device = process_state().device
        precision = resolve_precision(config.mixed_precision, device)
        # Accelerate keeps precision in a process-wide singleton; reset it so several runs (the recipe's
        # stages) can each choose their own. The process group (PartialState) is kept.
        AcceleratorState._reset_state()
        GradientState._reset_state()
        ddp = DistributedDataParallelKwargs(find_unused_parameters=getattr(stage, "find_unused_parameters", False))
        trackers = _trackers(config)
        self.accelerator = acc = Accelerator(cpu=use_cpu, mixed_precision=precision, kwargs_handlers=[ddp],
                                             log_with=trackers or None)
        if trackers:
            acc.init_trackers("brushwork")
        self.precision = precision
        world = acc.num_processes
        if world > 1:
            # gloo aborts a process that exits with its process group still open ("terminate called without an
            # active exception"); close it at exit, after every stage of this process has run.
            atexit.register(_close_process_group)
        if config.batch_size % (world * config.grad_accum):
            raise BrushworkError(f"batch_size {config.batch_size} must be divisible by processes ({world}) x "
                                 f"grad_accum ({config.grad_accum}) so every micro-batch has the same size.")

        self.modules = stage.modules()
        self.groups = stage.optimizers()
        _check_stage(self.modules, self.groups)
        self.resume_from, self.saved_training = (self._named_checkpoint(Path(config.resume_from))
                                                 if config.resume_from else self._newest_intact(existing))
        self.saved_state = _check_resume(self.resume_from, stage, config) if self.resume_from else None
        self.start_step = self.saved_state["step"] if self.saved_state else 0
        self.dataset = stage.dataset()
        if len(self.dataset) == 0:
            raise BrushworkError(f"The data set of stage {stage.name!r} is empty; add images and captions.")

        if self.resume_from:
            self._load_weights(self.resume_from)
        self.ema = None
        if config.ema_decay is not None:
            # Copies made before prepare(): accelerate patches forward() of the prepared module in place.
            self.ema = {name: EMA(m, config.ema_decay) for name, m in self.modules.items()}
            if self.resume_from:
                for name, ema in self.ema.items():
                    self._load_module(ema.module, self.resume_from / f"ema-{name}.safetensors")
            for ema in self.ema.values():
                ema.module.to(acc.device)
        for module in self.modules.values():
            module.train()
        self.wrapped = {name: acc.prepare_model(m) for name, m in self.modules.items()}

        self.optimizers, self.schedulers = {}, {}
        for opt_name, names in self.groups.items():
            params = [p for n in names for p in self.modules[n].parameters() if p.requires_grad]
            # Fused AdamW is fastest on CPU and CUDA; with fp16 the non-fused step keeps accelerate's
            # skipped-step detection (the scheduler must not advance on an overflow).
            fused = acc.device.type in ("cpu", "cuda") and precision != "fp16"
            options = dict(stage.optimizer_options().get(opt_name, {}))
            lr = config.lr * options.pop("lr_scale", 1.0)
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, fused=fused, **options)
            self.schedulers[opt_name] = self._scheduler(optimizer, config.max_steps)
            # The scheduler is not prepared: accelerate would step it once per process.
            self.optimizers[opt_name] = acc.prepare_optimizer(optimizer)
        self.schedule_end = config.max_steps   # where the lr schedule ends (a time budget may move it)
        if self.resume_from:
            self._load_training_state(self.resume_from)

        sampler = StepBatchSampler(len(self.dataset), config.batch_size, config.grad_accum, acc.process_index,
                                   world, config.seed, self.start_step, config.max_steps)
        self.loader = DataLoader(PositionSeededDataset(self.dataset, config.seed), batch_sampler=sampler,
                                 collate_fn=stage.collate, num_workers=config.num_workers,
                                 pin_memory=acc.device.type == "cuda")
        if acc.is_main_process:
            self._prepare_out_dir()

    def _scheduler(self, optimizer, total_steps: int, done: int = 0):
        """The lr schedule over `total_steps`, `done` steps into it."""
        warmup = self.config.warmup_steps
        if self.config.warmup_share is not None:
            warmup = min(warmup, round(self.config.warmup_share * total_steps))
        scheduler = get_scheduler(self.config.lr_schedule, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=total_steps)
        if done:
            scheduler.last_epoch = done - 1
            scheduler.step()
        return scheduler

    def _named_checkpoint(self, checkpoint: Path) -> tuple[Path, dict]:
        """The checkpoint resume_from names, checked as the newest one would be."""
        problem, training = checkpoint_problem(checkpoint, list(self.modules), self.config.ema_decay is not None)
        if problem is not None:
            raise BrushworkError(f"Cannot resume from {checkpoint}: {problem}.")
        later = [p.name for p in checkpoint_folders(self.out_dir) if _checkpoint_step(p) > _checkpoint_step(checkpoint)]
        if later:
            self.accelerator.print(f"{self.stage.name}: resuming from {checkpoint.name}; the later checkpoints "
                                   f"({', '.join(later)}) are replaced as this run trains.")
        return checkpoint, training

    def _newest_intact(self, checkpoints: list[Path]) -> tuple[Path | None, dict | None]:
        """The newest checkpoint whose files are all there and readable, and its training state; a line names
        the damaged ones passed over. BrushworkError when there are checkpoints but none is intact."""
        damaged = []
        for checkpoint in reversed(checkpoints):
            problem, training = checkpoint_problem(checkpoint, list(self.modules), self.config.ema_decay is not None)
            if problem is None:
                if damaged:
                    self.accelerator.print(f"{self.stage.name}: checkpoint {'; '.join(damaged)}; resuming from "
                                           f"{checkpoint.name}, the newest intact one (the run replaces the damaged).")
                return checkpoint, training
            damaged.append(f"{checkpoint.name} is damaged: {problem}")
        if damaged:
            raise BrushworkError(f"No intact checkpoint to resume from in {self.checkpoint_root} "
                                 f"({'; '.join(damaged)}). Delete those folders to start again at step 0, or train "
                                 "into a new out_dir.")
        return None, None

    def _prepare_out_dir(self) -> None:
        self.checkpoint_root.mkdir(exist_ok=True)
        for leftover in self.checkpoint_root.glob(_TEMP_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)  # a save or delete that was interrupted
        if self.resume_from is None:
            if self.config.resume:
                self.accelerator.print(f"No checkpoint in {self.checkpoint_root}; "
                                       f"starting {self.stage.name} at step 0.")
            self.log_path.write_text("")
        elif self.log_path.exists():  # drop records of steps after the checkpoint: they are trained again
            kept = [line for line in self.log_path.read_text().splitlines() if _log_step(line) <= self.start_step]
            self.log_path.write_text("".join(line + "\n" for line in kept))

    def _load_module(self, module: nn.Module, path: Path) -> None:
        try:
            load_model(module, path, strict=True)
        except (OSError, RuntimeError) as e:
            raise BrushworkError(f"Checkpoint file {path} does not fit the stage's module: {e}. "
                                 "Train into a new out_dir.") from None

    def _load_weights(self, checkpoint: Path) -> None:
        for name, module in self.modules.items():
            self._load_module(module, checkpoint / f"{name}.safetensors")

    def _load_training_state(self, checkpoint: Path) -> None:
        training, self.saved_training = self.saved_training, None  # loaded (and so checked) by checkpoint_problem
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(training["optimizers"][name])
            self.schedulers[name].load_state_dict(training["schedulers"][name])
        if self.accelerator.scaler is not None and training.get("scaler"):
            self.accelerator.scaler.load_state_dict(training["scaler"])
        rng = training["rng"]
        torch.set_rng_state(rng["torch"])
        np_state = rng["numpy"]
        np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))

    # ---- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, elapsed: float) -> Path:
        """Main process only. Writes a temp folder, fsyncs it, renames it into place, then prunes old ones. A full
        disk is one BrushworkError: the temp folder is removed and the previous checkpoints are left as they are."""
        final = self.checkpoint_root / f"step-{step:08d}"
        temp = self.checkpoint_root / f"{_TEMP_PREFIX}{final.name}-{os.getpid()}"
        shutil.rmtree(temp, ignore_errors=True)
        needed, free = self._checkpoint_bytes(), shutil.disk_usage(self.checkpoint_root).free
        if free < needed:
            raise BrushworkError(f"Not enough disk space for checkpoint {final.name}: it needs about "
                                 f"{needed / 1e6:,.0f} MB and {self.checkpoint_root} has {free / 1e6:,.0f} MB free. "
                                 + self._previous_checkpoint_hint())
        try:
            self._write_checkpoint(temp, step, elapsed)
        except OSError as e:
            shutil.rmtree(temp, ignore_errors=True)
            raise BrushworkError(f"Could not write checkpoint {final.name} in {self.checkpoint_root}: "
                                 f"{e.strerror or e}. " + self._previous_checkpoint_hint()) from None
        if final.exists():  # same step saved before (e.g. a resumed run that ended there): replace it
            stale = final.with_name(f"{_TEMP_PREFIX}old-{final.name}-{os.getpid()}")
            os.rename(final, stale)
            shutil.rmtree(stale)
        os.rename(temp, final)
        _fsync(self.checkpoint_root)
        folders = checkpoint_folders(self.out_dir)
        # Newer folders are damaged ones that resume passed over: this run trains their steps again.
        newer = [p for p in folders if _checkpoint_step(p) > step]
        for old in newer + [p for p in folders if _checkpoint_step(p) <= step][: -self.config.keep_checkpoints]:
            doomed = old.with_name(f"{_TEMP_PREFIX}delete-{old.name}")
            os.rename(old, doomed)  # a crash during rmtree must not leave a half folder that looks complete
            shutil.rmtree(doomed)
        return final

    def _write_checkpoint(self, temp: Path, step: int, elapsed: float) -> None:
        temp.mkdir(parents=True)
        for name, module in self.modules.items():
            save_model(module, str(temp / f"{name}.safetensors"), force_contiguous=True)
        for name, ema in (self.ema or {}).items():
            save_model(ema.module, str(temp / f"ema-{name}.safetensors"), force_contiguous=True)
        np_state = np.random.get_state()
        training = {
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
            "rng": {"torch": torch.get_rng_state(),
                    "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
                    "python": random.getstate()},
        }
        torch.save(training, temp / "training_state.pt")
        state = {"format": CHECKPOINT_FORMAT, "stage": self.stage.name, "step": step, "elapsed_s": elapsed,
                 "num_processes": self.accelerator.num_processes, "mixed_precision": self.precision,
                 "fingerprint": _normalized(self.stage.fingerprint()), "config": _config_json(self.config)}
        (temp / "state.json").write_text(json.dumps(state, indent=2) + "\n")  # last: marks the folder complete
        for path in temp.iterdir():
            _fsync(path)
        _fsync(temp)

    def _checkpoint_bytes(self) -> int:
        """About the size of a checkpoint: the weights, their EMA copies and the optimizers' state."""
        weights = sum(t.numel() * t.element_size() for m in self.modules.values() for t in m.state_dict().values())
        optimizer_state = sum(t.numel() * t.element_size() for opt in self.optimizers.values()
                              for values in opt.state.values() for t in values.values() if torch.is_tensor(t))
        return weights * (2 if self.ema else 1) + optimizer_state

    def _previous_checkpoint_hint(self) -> str:
        if self.last_checkpoint is None:
            return "No checkpoint of this run was written before; free some space and start again."
        return (f"The last checkpoint, {self.last_checkpoint} (step {self.last_checkpoint_step}), is intact: free "
                "some space and resume from it with resume=True (brushwork train --resume).")

    # ---- the loop ------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        acc, config = self.accelerator, self.config
        # Modules each optimizer's loss sees: its own wrapped (DDP syncs them), the others plain.
        trained = self.wrapped
        if config.compile:
            trained = {n: torch.compile(m, dynamic=False) for n, m in self.wrapped.items()}
        self.phase_modules = {
            opt: {n: trained[n] if n in names else self.modules[n] for n in self.modules}
            for opt, names in self.groups.items()
        }
        self.generator = torch.Generator(device=acc.device)
        self.pending_losses: list[torch.Tensor] = []  # per step: [n_optimizers], not yet synced to host
        self.metric_sums: dict[str, Any] = {}
        self.metric_counts: dict[str, int] = {}
        self.interval_losses: list[list[float]] = []
        self.last_checkpoint = self.resume_from
        self.last_checkpoint_step = self.start_step if self.resume_from else None
        elapsed_before = self.saved_state["elapsed_s"] if self.saved_state else 0.0
        run_start = interval_start = time.perf_counter()
        interval_first_step = step = self.start_step
        batches = iter(self.loader)

        progress = Progress(TextColumn(f"[bold]{self.stage.name}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                            TextColumn("{task.fields[status]}"),
                            disable=not acc.is_main_process, refresh_per_second=2)
        task = progress.add_task("train", total=config.max_steps, completed=step, status="")
        plain_lines = acc.is_main_process and not progress.console.is_terminal
        last_plain_line = time.perf_counter()
        try:
            with progress:
                while step < config.max_steps:
                    micro_batches = [send_to_device(next(batches), acc.device, non_blocking=True)
                                     for _ in range(config.grad_accum)]
                    self.pending_losses.append(self._train_step(step, micro_batches))
                    step += 1
                    if step == self.start_step + 1:
                        first_step_end = time.perf_counter()   # speed is measured without the first step's compile
                    self.stage.after_step(step)
                    for ema in (self.ema or {}).values():
                        ema.update(step)
                    progress.advance(task)
                    if step == self.start_step + 1 and acc.num_processes > 1:
                        self._check_replicas_in_sync()

                    since = step - self.start_step - 2 * config.log_every
                    if since >= 0 and (since % (REFIT_LOGS * config.log_every) == 0 or step == self.schedule_end):
                        self._fit_schedule_to_budget(step, run_start, first_step_end)
                        progress.update(task, total=self.schedule_end)  # the bar's eta follows the budget
                    # A budget's schedule that ends with too little time left for another: the lr is 0 from here
                    # (a cosine would climb its next cycle), so the stage stops and its time goes to the next one.
                    schedule_done = step == self.schedule_end < config.max_steps
                    time_up = schedule_done or (step % config.log_every == 0 and self._time_up(run_start))
                    save_now = time_up or step == config.max_steps or (
                        config.checkpoint_every > 0 and step % config.checkpoint_every == 0)
                    if step % config.log_every == 0 or save_now:
                        self._flush_losses(step)
                        now = time.perf_counter()
                        images_per_s = (step - interval_first_step) * config.batch_size / (now - interval_start)
                        interval_start, interval_first_step = now, step
                        record = self._log_record(step, images_per_s, elapsed_before + now - run_start)
                        if acc.is_main_process:
                            with self.log_path.open("a") as f:
                                f.write(json.dumps(record) + "\n")
                            acc.log(record, step=step)
                            progress.update(task, status=f"loss {record['loss']:.4g}  {images_per_s:.1f} img/s")
                            if plain_lines and now - last_plain_line >= PLAIN_PROGRESS_S:
                                last_plain_line = now
                                progress.console.print(
                                    f"{self.stage.name}: step {step:,} of {self.schedule_end:,}, loss "
                                    f"{record['loss']:.4g}, {images_per_s:.1f} img/s, "
                                    f"{(now - run_start) / 60:.1f} min", highlight=False)
                    if save_now:
                        if acc.is_main_process:
                            self.save_checkpoint(step, elapsed_before + time.perf_counter() - run_start)
                        self.last_checkpoint = self.checkpoint_root / f"step-{step:08d}"
                        self.last_checkpoint_step = step
                        interval_start = time.perf_counter()  # images/s measures training, not saving
                    if config.sample_every and step % config.sample_every == 0 and acc.is_main_process:
                        self._save_sample(step)
                    if time_up:
                        if acc.is_main_process:
                            why = "its lr schedule, fitted to its time, has ended" if schedule_done else "its time is up"
                            progress.console.print(f"{self.stage.name}: stopped at step {step:,} of "
                                                   f"{config.max_steps:,}: {why} (resume to go on)")
                        break
        finally:
            for name, wrapped in self.wrapped.items():  # undo accelerate's in-place forward patch
                self.modules[name] = acc.unwrap_model(wrapped, keep_fp32_wrapper=False)
            for tracker in acc.trackers:  # not acc.end_training(): that also ends the process group later stages use
                tracker.finish()
        ema = {name: e.module for name, e in self.ema.items()} if self.ema is not None else None
        return TrainResult(step=step, modules=self.modules, ema=ema, log_path=self.log_path,
                           checkpoint=self.last_checkpoint)

    def _seconds_left(self, run_start: float) -> float | None:
        """Time left of this run's budget (max_minutes, stop_at), or None without one."""
        minutes, stop_at = self.config.max_minutes, self.config.stop_at
        left = [minutes * 60 - (time.perf_counter() - run_start)] if minutes else []
        left += [stop_at - time.time()] if stop_at is not None else []
        return min(left) if left else None

    def _fit_schedule_to_budget(self, step: int, run_start: float, first_step_end: float) -> None:
        """Shorten the lr schedule to the steps the time left allows at this run's speed since its first step
        (see TrainConfig; the first step holds one-time work: torch.compile, allocations); every process gets the
        main process's estimate."""
        left = self._seconds_left(run_start)
        if left is None:
            return
        per_step = (time.perf_counter() - first_step_end) / (step - self.start_step - 1)
        reachable = torch.tensor([min(self.config.max_steps, step + max(1, int(left / per_step)))])
        if self.accelerator.num_processes > 1:
            reachable = broadcast(reachable.to(self.accelerator.device), from_process=0).cpu()
        total = int(reachable.item())
        near = 0.05 * self.schedule_end
        if abs(total - self.schedule_end) < near if step < self.schedule_end else total - step < near:
            return   # a small move before the end; at the end, too little time left to be worth a new cosine
        self.schedule_end = total
        self.schedulers = {name: self._scheduler(old.optimizer, total, done=step)
                           for name, old in self.schedulers.items()}
        self.accelerator.print(f"{self.stage.name}: the time budget allows about {total:,} of {self.config.max_steps:,} "
                               "steps; the lr schedule ends there.")

    def _time_up(self, run_start: float) -> bool:
        """Whether this run's time budget is spent; every process gets the main process's answer."""
        left = self._seconds_left(run_start)
        if left is None:
            return False
        up = left <= 0
        if self.accelerator.num_processes == 1:
            return up
        return bool(broadcast(torch.tensor([up], device=self.accelerator.device), from_process=0).item())

    def _train_step(self, step: int, micro_batches: list[Any]) -> torch.Tensor:
        """One optimizer step of every optimizer, in order; returns the mean loss per optimizer (on device)."""
        acc, config = self.accelerator, self.config
        accum, single = config.grad_accum, len(self.groups) == 1
        step_losses = []
        for opt_index, (opt_name, names) in enumerate(self.groups.items()):
            optimizer, modules = self.optimizers[opt_name], self.phase_modules[opt_name]
            prefix = "" if single else f"{opt_name}/"
            if not single:  # the previous optimizer's loss may have left gradients on these modules
                for module in self.modules.values():
                    module.zero_grad(set_to_none=True)
            total = torch.zeros((), device=acc.device)
            for micro, batch in enumerate(micro_batches):
                seed = derive_seed("loss", config.seed, step, acc.process_index, micro, opt_index)
                self.generator.manual_seed(seed)
                torch.manual_seed(seed)
                with contextlib.ExitStack() as no_sync:
                    if micro < accum - 1:
                        for name in names:
                            no_sync.enter_context(acc.no_sync(self.wrapped[name]))
                    with acc.autocast():
                        loss, metrics = self.stage.loss(opt_name, modules, batch, self.generator)
                    acc.backward(loss / accum)
                total += loss.detach().float()
                self._add_metrics(metrics, prefix)
            if config.grad_clip is not None:
                acc.unscale_gradients(optimizer)
                params = [p for group in optimizer.param_groups for p in group["params"]]
                self._add_metrics({"grad_norm": torch.nn.utils.clip_grad_norm_(params, config.grad_clip)}, prefix)
            optimizer.step()
            if not optimizer.step_was_skipped:  # fp16 overflow: the scaler skipped this update
                self.schedulers[opt_name].step()
            optimizer.zero_grad(set_to_none=True)
            step_losses.append(total / accum)
        return torch.stack(step_losses)

    def _add_metrics(self, metrics: dict[str, Any], prefix: str) -> None:
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float()
            key = prefix + key
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + value
            self.metric_counts[key] = self.metric_counts.get(key, 0) + 1

    def _flush_losses(self, step: int) -> None:
        """One host sync + one all-reduce for the whole interval; stops the run on a NaN/inf loss."""
        device = self.accelerator.device
        losses = torch.stack(self.pending_losses)
        keys = sorted(self.metric_sums)
        means = [torch.as_tensor(self.metric_sums[k], dtype=torch.float32, device=device) / self.metric_counts[k]
                 for k in keys]
        packed = torch.cat([losses.flatten(), torch.stack(means).flatten() if means else losses.new_zeros(0)])
        values = self.accelerator.reduce(packed, "mean").tolist()
        n_steps, n_opt = losses.shape
        per_step = [values[i * n_opt:(i + 1) * n_opt] for i in range(n_steps)]
        self.metric_means = dict(zip(keys, values[n_steps * n_opt:]))
        self.pending_losses, self.metric_sums, self.metric_counts = [], {}, {}
        first_step = step - n_steps + 1
        for i, row in enumerate(per_step):
            for opt_name, value in zip(self.groups, row):
                if not math.isfinite(value):
                    self._stop_on_bad_loss(first_step + i, opt_name, value)
        self.interval_losses.extend(per_step)

    def _stop_on_bad_loss(self, step: int, opt_name: str, value: float) -> None:
        what = f"The {self.stage.name} loss" + ("" if len(self.groups) == 1 else f" of optimizer {opt_name!r}")
        if self.last_checkpoint is None:
            hint = ("No checkpoint was written before it; start again with a lower lr, a smaller grad_clip "
                    "or mixed_precision='no'.")
        else:
            hint = (f"Last good checkpoint: {self.last_checkpoint} (step {self.last_checkpoint_step}); resume from it "
                    "with resume=True (brushwork train --resume), ideally with a lower lr or mixed_precision='no'.")
        raise BrushworkError(f"{what} became {value} at step {step}; training stopped. {hint}")

    def _log_record(self, step: int, images_per_s: float, elapsed: float) -> dict:
        rows = self.interval_losses
        record: dict[str, Any] = {"step": step, "loss": sum(sum(r) for r in rows) / len(rows)}
        if len(self.groups) > 1:
            for i, opt_name in enumerate(self.groups):
                record[f"loss/{opt_name}"] = sum(r[i] for r in rows) / len(rows)
        record.update(self.metric_means)
        for opt_name, scheduler in self.schedulers.items():
            record["lr" if len(self.groups) == 1 else f"lr/{opt_name}"] = scheduler.get_last_lr()[0]
        record["images_per_s"] = images_per_s
        record["elapsed_s"] = elapsed
        self.interval_losses = []
        return record

    def _check_replicas_in_sync(self) -> None:
        """After the first step every process must hold the same weights; if not, DDP did not sync gradients."""
        sums = torch.stack([torch.stack([p.detach().double().sum() for p in m.parameters()]).sum()
                            for m in self.modules.values()])
        spread = self.accelerator.reduce(sums, "max") + self.accelerator.reduce(-sums, "max")
        scale = sums.abs() + 1.0
        bad = [name for name, s, c in zip(self.modules, spread.tolist(), scale.tolist()) if s > 1e-4 * c]
        if bad:
            raise RuntimeError(f"Modules {bad} differ between processes after one step: Stage.loss must call them "
                               "as modules[name](...) so DDP can synchronise their gradients.")

    @torch.no_grad()
    def _save_sample(self, step: int) -> None:
        modules = {n: e.module for n, e in self.ema.items()} if self.ema is not None else self.modules
        for module in modules.values():
            module.eval()
        try:
            image = self.stage.sample(modules, step)
        finally:
            for module in self.modules.values():
                module.train()
        if image is not None:
            samples = self.out_dir / "samples"
            samples.mkdir(exist_ok=True)
            image.save(samples / f"step-{step:08d}.png")
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.log_images({"samples": np.asarray(image.convert("RGB"))[None]}, step, dataformats="NHWC")
                else:
                    tracker.log_images({"samples": [image]}, step)


def run(stage: Stage, config: TrainConfig) -> TrainResult:
    """Train `stage` for config.max_steps optimizer steps (see the module docstring for order and seeding).

    Works in one process or under `torchrun` / `accelerate launch` (DDP; gloo on CPU). Only the main process
    writes log.jsonl, samples/ and checkpoints/ (out_dir must be shared for multi-machine resume).
    Raises BrushworkError for a bad config, an unwritable out_dir, a mismatched resume, or a NaN/inf loss.
    A resumed run that already reached max_steps returns its checkpoint's state without training.
    """
    trainer = _Trainer(stage, config)
    trainer.setup()
    return trainer.train()
