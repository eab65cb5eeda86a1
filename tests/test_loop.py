"""The training loop on toy stages: learning, logs, checkpoints, EMA, NaN stop, GAN, config errors, data order."""

import json
import os
import math
import re

import pytest
import torch
from loop_toy import ToyGan, ToyStage, make_config
from safetensors.torch import load_file

from brushwork.errors import BrushworkError
from brushwork.train import loop
from brushwork.train.loop import REFIT_LOGS, BaseStage, StepBatchSampler, list_checkpoints, run


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_learns_logs_checkpoints_and_ema(tmp_path):
    config = make_config(tmp_path, 60, checkpoint_every=20, keep_checkpoints=2, log_every=10, ema_decay=0.9,
                         sample_every=30)
    result = run(ToyStage(), config)

    log = read_log(result.log_path)
    assert [r["step"] for r in log] == [10, 20, 30, 40, 50, 60]
    assert {"loss", "mae", "grad_norm", "lr", "images_per_s", "elapsed_s"} <= set(log[0])
    assert log[-1]["loss"] < 0.3 * log[0]["loss"]

    checkpoints = list_checkpoints(tmp_path)
    assert [c.name for c in checkpoints] == ["step-00000040", "step-00000060"]
    assert result.checkpoint == checkpoints[-1] and result.step == 60
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert {p.name for p in checkpoints[-1].iterdir()} == {
        "net.safetensors", "ema-net.safetensors", "training_state.pt", "state.json"}
    state = json.loads((checkpoints[-1] / "state.json").read_text())
    assert state["step"] == 60 and state["fingerprint"] == ToyStage().fingerprint()

    saved = load_file(checkpoints[-1] / "net.safetensors")
    assert torch.equal(saved["0.weight"], result.modules["net"][0].weight)
    ema_weight, raw_weight = result.ema["net"][0].weight, result.modules["net"][0].weight
    assert not torch.allclose(ema_weight, raw_weight)
    assert torch.equal(load_file(checkpoints[-1] / "ema-net.safetensors")["0.weight"], ema_weight)
    assert (tmp_path / "samples" / "step-00000030.png").is_file()
    assert (tmp_path / "samples" / "step-00000060.png").is_file()


def test_grad_accum_equals_one_big_batch(tmp_path):
    whole = run(ToyStage(), make_config(tmp_path / "a", 10, batch_size=16))
    accumulated = run(ToyStage(), make_config(tmp_path / "b", 10, batch_size=16, grad_accum=4))
    losses_whole = [r["loss"] for r in read_log(whole.log_path)]
    losses_acc = [r["loss"] for r in read_log(accumulated.log_path)]
    assert losses_whole == pytest.approx(losses_acc, rel=1e-5)
    for a, b in zip(whole.modules["net"].parameters(), accumulated.modules["net"].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_cosine_schedule_with_warmup(tmp_path):
    result = run(ToyStage(), make_config(tmp_path, 20, lr=0.1, warmup_steps=5, lr_schedule="cosine"))
    lrs = [r["lr"] for r in read_log(result.log_path)]  # lr for the next step, logged after step s
    expected = [0.1 * s / 5 if s < 5 else 0.1 * 0.5 * (1 + math.cos(math.pi * (s - 5) / 15)) for s in range(1, 21)]
    assert lrs == pytest.approx(expected, abs=1e-9)


def test_bf16_autocast_runs(tmp_path):
    result = run(ToyStage(), make_config(tmp_path, 10, mixed_precision="bf16"))
    losses = [r["loss"] for r in read_log(result.log_path)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert json.loads((result.checkpoint / "state.json").read_text())["mixed_precision"] == "bf16"
    # accelerate's autocast patch on forward() is removed again from the returned module
    assert "_original_forward" not in vars(result.modules["net"])


def test_nan_loss_stops_and_names_last_good_checkpoint(tmp_path):
    config = make_config(tmp_path, 40, checkpoint_every=10, log_every=5)
    with pytest.raises(BrushworkError) as error:
        run(ToyStage(nan_at_call=23), config)  # loss call 23 belongs to step 23
    message = str(error.value)
    assert "step 23" in message and "step-00000020" in message and "resume" in message
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000020"]


def test_nan_before_any_checkpoint(tmp_path):
    with pytest.raises(BrushworkError, match="step 2;.*No checkpoint"):
        run(ToyStage(nan_at_call=2), make_config(tmp_path, 10, checkpoint_every=5))


def test_gan_stage_steps_both_optimizers(tmp_path):
    stage = ToyGan()
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in stage.modules().items()}
    result = run(stage, make_config(tmp_path, 8, lr=1e-3, ema_decay=0.5))
    for name, module in result.modules.items():
        assert all(not torch.equal(a, b) for a, b in zip(before[name], module.parameters())), name
    record = read_log(result.log_path)[-1]
    assert {"loss/d", "loss/g", "lr/d", "lr/g", "d/grad_norm", "g/grad_norm", "d/d_real"} <= set(record)
    assert record["loss"] == pytest.approx(record["loss/d"] + record["loss/g"])
    assert set(result.ema) == {"g", "d"}


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BrushworkError, match="Cannot write to the output folder"):
        run(ToyStage(), make_config(blocker / "run", 5))


def test_existing_checkpoints_need_resume(tmp_path):
    run(ToyStage(), make_config(tmp_path, 5))
    with pytest.raises(BrushworkError, match="already holds checkpoints.*resume=True"):
        run(ToyStage(), make_config(tmp_path, 10))


def test_finished_run_resumes_without_training(tmp_path):
    first = run(ToyStage(), make_config(tmp_path, 5))
    stage = ToyStage()
    again = run(stage, make_config(tmp_path, 5, resume=True))
    assert stage.calls == 0 and again.step == 5 and again.checkpoint == first.checkpoint
    assert torch.equal(again.modules["net"][0].weight, first.modules["net"][0].weight)


def test_time_limit_stops_at_a_log_step_with_a_checkpoint_and_resume_goes_on(tmp_path):
    # 0.05 s per step and a 0.1 s limit: past the limit by the first log step (5), far before step 40.
    stopped = run(ToyStage(delay=0.05), make_config(tmp_path, 40, log_every=5, checkpoint_every=0,
                                                     max_minutes=0.1 / 60))
    assert stopped.step == 5 and stopped.checkpoint.name == "step-00000005"
    assert [r["step"] for r in read_log(stopped.log_path)] == [5]
    finished = run(ToyStage(), make_config(tmp_path, 40, log_every=5, checkpoint_every=0, resume=True))
    assert finished.step == 40 and [r["step"] for r in read_log(finished.log_path)][-1] == 40


def test_a_shared_deadline_stops_the_run_like_its_own_limit(tmp_path):
    import time

    stopped = run(ToyStage(delay=0.05), make_config(tmp_path, 40, log_every=5, checkpoint_every=0,
                                                     stop_at=time.time() + 0.1))
    assert stopped.step == 5 and stopped.checkpoint.name == "step-00000005"


def test_a_time_budget_ends_the_lr_schedule_within_it(tmp_path):
    # 1000 steps would take about 20 s; the budget is 1.5 s. The cosine must decay within it, not stay at its peak.
    stopped = run(ToyStage(delay=0.02), make_config(tmp_path, 1000, log_every=5, checkpoint_every=0, lr=0.1,
                                                    lr_schedule="cosine", max_minutes=1.5 / 60))
    lrs = [r["lr"] for r in read_log(stopped.log_path)]
    assert stopped.step < 500 and lrs[0] > 0.09 and lrs[-1] < 0.05


def test_a_warmup_given_as_a_share_follows_the_schedule_the_budget_leaves(tmp_path, monkeypatch):
    # 500 warm-up steps of 10,000 would outlast the 75 steps 1.5 s allows: as 5% it is a few steps of those.
    # The loop's clock moves 0.02 s a step, so a busy machine cannot change the outcome.
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    stopped = run(ClockedStage(clock, seconds=0.02), make_config(
        tmp_path, 10_000, log_every=5, checkpoint_every=0, lr=0.1, lr_schedule="cosine", warmup_steps=500,
        warmup_share=0.05, max_minutes=1.5 / 60))
    monkeypatch.undo()   # the run below has no budget, on the real clock
    lrs = [r["lr"] for r in read_log(stopped.log_path)]
    assert 60 <= stopped.step <= 80 and max(lrs) > 0.09 and lrs[-1] < 0.05, lrs
    whole = run(ToyStage(), make_config(tmp_path / "whole", 40, log_every=1, checkpoint_every=0, lr=0.1,
                                        lr_schedule="linear", warmup_steps=500, warmup_share=0.05))
    assert [r["lr"] for r in read_log(whole.log_path)][:3] == pytest.approx([0.05, 0.1, 0.1 * 37 / 38])   # 2 of 40


class SpeedsUpStage(ToyStage):
    """Slow for its first calls (a busy machine), then fast."""

    def loss(self, *args):
        self.delay = 0.05 if self.calls < 10 else 0.002
        return super().loss(*args)


def test_a_run_that_speeds_up_gets_its_lr_schedule_back(tmp_path):
    # The first estimate (step 10, at 0.05 s a step) ends the schedule near step 40; at 0.002 s a step the 3 s
    # budget allows hundreds more. Refitting every REFIT_LOGS log steps must move the end out, not leave the
    # rest of the run at lr 0, and the cosine must still decay within the budget.
    stopped = run(SpeedsUpStage(), make_config(tmp_path, 5000, log_every=5, checkpoint_every=0, lr=0.1,
                                               lr_schedule="cosine", max_minutes=3 / 60))
    lrs = {r["step"]: r["lr"] for r in read_log(stopped.log_path)}
    refit = 10 + REFIT_LOGS * 5
    assert stopped.step > refit + 50, stopped.step
    assert max(lr for step, lr in lrs.items() if step > refit) > 0.01
    assert lrs[max(lrs)] < 0.05


class Clock:
    """The loop's clock, moved only by the stage: each step takes exactly the seconds the stage says."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


class ClockedStage(ToyStage):
    """By default 1 s a step for the first 10 steps (the schedule is fitted to that speed), then 0.97 s; with
    `seconds`, that long every step."""

    def __init__(self, clock: Clock, seconds: float | None = None):
        super().__init__()
        self.clock = clock
        self.seconds = seconds

    def loss(self, *args):
        self.clock.now += self.seconds or (1.0 if self.calls < 10 else 0.97)
        return super().loss(*args)


def test_a_run_that_reaches_its_fitted_schedule_early_stops_there_instead_of_climbing_the_next_cycle(
        tmp_path, monkeypatch, capsys):
    # Fitted at step 10 to 100 steps in a 100 s budget, the run reaches step 100 at 97.3 s: too little time for
    # another cosine (under 5%). It must stop at the schedule's end with lr 0, not train on as the cosine climbs.
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    stopped = run(ClockedStage(clock), make_config(tmp_path, 1000, log_every=5, checkpoint_every=0, lr=0.1,
                                                   lr_schedule="cosine", max_minutes=100 / 60))
    lrs = [r["lr"] for r in read_log(stopped.log_path)]
    assert stopped.step == 100 and stopped.checkpoint.name == "step-00000100"
    assert lrs[-1] == pytest.approx(0, abs=1e-9) and lrs == sorted(lrs, reverse=True)
    printed = " ".join(capsys.readouterr().out.split())   # the console wraps long lines
    assert "toy: stopped at step 100 of 1,000: its lr schedule, fitted to its time, has ended" in printed


class CompilingStage(ToyStage):
    """A first step of 30 s (torch.compile's), then 1 s a step."""

    def __init__(self, clock: Clock):
        super().__init__()
        self.clock = clock

    def loss(self, *args):
        self.clock.now += 30.0 if self.calls == 0 else 1.0
        return super().loss(*args)


def test_the_budget_is_fitted_to_the_speed_after_the_first_step(tmp_path, monkeypatch, capsys):
    # A 130 s budget: 30 s of compile in the first step, then 100 steps of 1 s. Counting the compile as speed
    # (39 s for the first 10 steps) fits the schedule to about 33 steps; measured from the first step's end,
    # to about 101, and the run makes them in one cosine.
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    result = run(CompilingStage(clock), make_config(tmp_path, 1000, log_every=5, checkpoint_every=0, lr=0.1,
                                                    lr_schedule="cosine", max_minutes=130 / 60))
    printed = " ".join(capsys.readouterr().out.split())
    fits = [int(n.replace(",", "")) for n in re.findall(r"the time budget allows about ([\d,]+) of", printed)]
    assert fits[0] == 101, fits
    lrs = [r["lr"] for r in read_log(result.log_path)]
    assert result.step >= 100 and lrs == sorted(lrs, reverse=True)


def test_without_a_terminal_progress_comes_as_plain_lines_that_follow_the_budget(tmp_path, monkeypatch, capsys):
    # pytest's captured stdout is no terminal, as a log file is not: the bar draws nothing, so lines must come.
    monkeypatch.setattr(loop, "PLAIN_PROGRESS_S", 0.0)
    run(ToyStage(), make_config(tmp_path / "full", 20, log_every=5, checkpoint_every=0))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("toy: step")]
    assert [line.split(",")[0] for line in lines] == [f"toy: step {n} of 20" for n in (5, 10, 15, 20)]
    # 1,000 steps of 0.02 s against a 1 s budget: the lines count to the steps the budget allows, not to 1,000
    run(ToyStage(delay=0.02), make_config(tmp_path / "budget", 1000, log_every=5, checkpoint_every=0,
                                          max_minutes=1 / 60))
    totals = [int(total.replace(",", "")) for total in re.findall(r"^toy: step [\d,]+ of ([\d,]+),",
                                                                  capsys.readouterr().out, re.MULTILINE)]
    assert totals[0] == 1000 and 20 < totals[-1] < 200, totals


@pytest.mark.slow   # inductor compiles the toy's forward and backward: about half a minute
def test_a_compiled_run_trains_the_same_weights_and_saves_them_unprefixed(tmp_path):
    from torch._dynamo.utils import counters

    eager = run(ToyStage(), make_config(tmp_path / "eager", 6, log_every=2, checkpoint_every=0))
    counters.clear()
    compiled = run(ToyStage(), make_config(tmp_path / "compiled", 6, log_every=2, checkpoint_every=0, compile=True))
    assert counters["stats"]["unique_graphs"] >= 1   # dynamo did compile the stage's module
    for name, module in eager.modules.items():
        for (key, a), (other, b) in zip(module.state_dict().items(), compiled.modules[name].state_dict().items()):
            assert key == other and torch.allclose(a, b, atol=1e-5), key
    saved = load_file(compiled.checkpoint / "net.safetensors")
    assert set(saved) == set(eager.modules["net"].state_dict())   # no torch.compile "_orig_mod." prefix


def test_resume_from_a_named_checkpoint_is_exact(tmp_path):
    whole = run(ToyStage(), make_config(tmp_path / "whole", 20, keep_checkpoints=4))
    run(ToyStage(), make_config(tmp_path / "cut", 20, keep_checkpoints=4))
    named = tmp_path / "cut" / "checkpoints" / "step-00000010"
    again = run(ToyStage(), make_config(tmp_path / "cut", 20, keep_checkpoints=4, resume_from=named))
    assert again.step == 20 and torch.equal(again.modules["net"][0].weight, whole.modules["net"][0].weight)
    (named / "training_state.pt").write_bytes(b"")
    with pytest.raises(BrushworkError, match="Cannot resume from .*step-00000010: training_state.pt"):
        run(ToyStage(), make_config(tmp_path / "cut", 20, resume_from=named))


def test_resume_without_checkpoint_starts_at_zero(tmp_path):
    result = run(ToyStage(), make_config(tmp_path, 3, resume=True))
    assert result.step == 3 and [r["step"] for r in read_log(result.log_path)] == [1, 2, 3]


@pytest.mark.parametrize("overrides, pattern", [
    ({"batch_size": 10, "grad_accum": 3}, "divisible"),
    ({"lr_schedule": "exponential"}, "lr_schedule"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"mixed_precision": "fp16"}, "fp16"),
    ({"max_steps": 0}, "max_steps"),
    ({"max_minutes": 0}, "max_minutes"),
    ({"warmup_share": 1.5}, "warmup_share"),
])
def test_bad_config(tmp_path, overrides, pattern):
    with pytest.raises(BrushworkError, match=pattern):
        run(ToyStage(), make_config(tmp_path, 5, **overrides))


def test_empty_dataset(tmp_path):
    class Empty(ToyStage):
        def dataset(self):
            return []

    with pytest.raises(BrushworkError, match="empty"):
        run(Empty(), make_config(tmp_path, 5))


def test_module_in_no_optimizer_is_rejected(tmp_path):
    class Orphan(ToyGan):
        def optimizers(self):
            return {"g": ["g"]}

    with pytest.raises(ValueError, match="in none: \\['d'\\]"):
        run(Orphan(), make_config(tmp_path, 5))


def test_optimizer_options_reach_the_optimizers(tmp_path):
    class Frozen(ToyGan):
        def optimizer_options(self):
            return {"d": {"lr_scale": 0.0}, "g": {"betas": (0.0, 0.99)}}

    stage = Frozen()
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in stage.modules().items()}
    result = run(stage, make_config(tmp_path, 3, weight_decay=0.0))
    unchanged = [torch.equal(a, b) for a, b in zip(before["d"], result.modules["d"].parameters())]
    changed = [not torch.equal(a, b) for a, b in zip(before["g"], result.modules["g"].parameters())]
    assert all(unchanged) and any(changed)


def test_base_stage_defaults():
    class Minimal(BaseStage):
        def modules(self):
            return {"a": torch.nn.Linear(1, 1), "b": torch.nn.Linear(1, 1)}

        def dataset(self):
            return []

        def loss(self, optimizer, modules, batch, generator):
            raise AssertionError

        def fingerprint(self):
            return {}

    stage = Minimal()
    assert stage.optimizers() == {"main": ["a", "b"]} and stage.sample({}, 0) is None
    assert stage.optimizer_options() == {}
    assert stage.collate([{"x": torch.ones(2)}, {"x": torch.zeros(2)}])["x"].shape == (2, 2)


def positions_and_indices(num_items, batch, accum, world, steps, start=0):
    """Global batch per step as one flat list, gathered from every rank's micro-batches."""
    per_rank = [list(StepBatchSampler(num_items, batch, accum, r, world, seed=3, start_step=start, max_steps=steps))
                for r in range(world)]
    out = []
    for s in range(steps - start):
        for r in range(world):
            for micro in per_rank[r][s * accum:(s + 1) * accum]:
                out.extend(micro)
    return out


def test_data_order_is_the_same_for_any_split_and_resume():
    one = positions_and_indices(10, 8, 1, 1, steps=5)
    assert [p for p, _ in one] == list(range(40))
    assert sorted(i for _, i in one[:10]) == list(range(10))  # each epoch is a permutation
    assert sorted(i for _, i in one[10:20]) == list(range(10))
    assert [i for _, i in one[:10]] != [i for _, i in one[10:20]]  # a new order each epoch
    assert positions_and_indices(10, 8, 2, 2, steps=5) == one  # 2 ranks x 2 micro-batches
    assert positions_and_indices(10, 8, 4, 1, steps=5) == one
    assert positions_and_indices(10, 8, 1, 2, steps=5, start=3) == one[24:]  # resume at step 3


def test_data_loader_workers_change_nothing(tmp_path):
    randomized = dict(noise=0.1, dropout=0.2, augment=0.05)
    inline = run(ToyStage(**randomized), make_config(tmp_path / "a", 6))
    workers = run(ToyStage(**randomized), make_config(tmp_path / "b", 6, num_workers=2))
    assert read_log(inline.log_path)[-1]["loss"] == read_log(workers.log_path)[-1]["loss"]
    for a, b in zip(inline.modules["net"].parameters(), workers.modules["net"].parameters()):
        assert torch.equal(a, b)


def test_resume_ignores_private_config_keys_whose_order_changes(tmp_path):
    # diffusers' `_use_default_values` is built from a set: its order differs between processes.
    class ShuffledDefaults(ToyStage):
        def __init__(self, order):
            super().__init__()
            self.order = order

        def fingerprint(self):
            return super().fingerprint() | {"model": {"_use_default_values": self.order, "width": 4}}

    run(ShuffledDefaults(["a", "b"]), make_config(tmp_path, 4))
    resumed = run(ShuffledDefaults(["b", "a"]), make_config(tmp_path, 6, resume=True))
    assert resumed.step == 6

    class OtherWidth(ShuffledDefaults):
        def fingerprint(self):
            return super().fingerprint() | {"model": {"_use_default_values": self.order, "width": 5}}

    with pytest.raises(BrushworkError, match="configured differently.*width"):
        run(OtherWidth(["a", "b"]), make_config(tmp_path, 8, resume=True))


def test_a_full_disk_while_checkpointing_is_one_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    from brushwork.train import loop

    real_save_model = loop.save_model

    def save_model(module, path, **kwargs):
        if "step-00000010" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_model(module, path, **kwargs)

    monkeypatch.setattr(loop, "save_model", save_model)
    with pytest.raises(BrushworkError, match=r"Could not write checkpoint step-00000010 .*No space left on device. "
                                             r"The last checkpoint, .*step-00000005 \(step 5\), is intact"):
        run(ToyStage(), make_config(tmp_path, 10))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000005"]  # the temp folder removed
    assert loop.checkpoint_problem(tmp_path / "checkpoints" / "step-00000005", ["net"], ema=False)[0] is None
    monkeypatch.undo()
    assert run(ToyStage(), make_config(tmp_path, 10, resume=True)).step == 10


def test_a_checkpoint_that_cannot_fit_on_the_disk_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    from brushwork.train import loop

    monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.raises(BrushworkError, match=r"Not enough disk space for checkpoint step-00000005: it needs about "
                                             r"\d+ MB and .* has 0 MB free. No checkpoint of this run"):
        run(ToyStage(), make_config(tmp_path, 10))
    assert os.listdir(tmp_path / "checkpoints") == []
