"""Exact resume: a run killed with SIGKILL after a checkpoint, then resumed, ends bit-identical (fp32) to a run
that was never interrupted. Randomness is exercised on every path: loss-generator noise, dropout (global RNG),
data augmentation (global RNG in the data set), EMA, gradient clipping."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from loop_toy import ToyStage, make_config
from safetensors.torch import load_file

from brushwork.errors import BrushworkError
from brushwork.train.loop import checkpoint_folders, checkpoint_problem, list_checkpoints, run

TOY = Path(__file__).with_name("loop_toy.py")
STEPS = 30
RANDOM = dict(noise=0.1, dropout=0.2, augment=0.05)


def toy_config(out, **overrides):
    return make_config(out, STEPS, checkpoint_every=5, ema_decay=0.9, **overrides)


def kill_after_first_checkpoint(out: Path) -> int:
    command = [sys.executable, str(TOY), "--out", str(out), "--steps", str(STEPS), "--checkpoint-every", "5",
               "--ema", "0.9", "--noise", "0.1", "--dropout", "0.2", "--augment", "0.05", "--delay", "0.1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list_checkpoints(out):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared within 60 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    return process.wait()


def test_killed_then_resumed_run_equals_uninterrupted_run(tmp_path):
    reference = run(ToyStage(**RANDOM), toy_config(tmp_path / "reference"))

    out = tmp_path / "killed"
    assert kill_after_first_checkpoint(out) == -signal.SIGKILL
    killed_at = int(list_checkpoints(out)[-1].name.split("-")[1])
    assert killed_at < STEPS
    (out / "checkpoints" / ".tmp-step-00000099-1").mkdir()  # debris of an interrupted save: ignored, removed

    resumed_stage = ToyStage(**RANDOM)
    resumed = run(resumed_stage, toy_config(out, resume=True))
    assert resumed_stage.calls == STEPS - killed_at  # really resumed, not retrained from 0
    assert not (out / "checkpoints" / ".tmp-step-00000099-1").exists()

    # Tolerance: exact equality (fp32, same machine, same thread count).
    for name in ("net", "ema-net"):
        expected = load_file(reference.checkpoint / f"{name}.safetensors")
        actual = load_file(resumed.checkpoint / f"{name}.safetensors")
        for key in expected:
            assert torch.equal(expected[key], actual[key]), (name, key)
    expected_log = [json.loads(x) for x in reference.log_path.read_text().splitlines()]
    actual_log = [json.loads(x) for x in resumed.log_path.read_text().splitlines()]
    assert [r["step"] for r in actual_log] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in actual_log] == [r["loss"] for r in expected_log]
    state = json.loads((resumed.checkpoint / "state.json").read_text())
    assert state["elapsed_s"] > 0.1 * killed_at  # wall time carried over from the killed run (0.1 s/step)


def test_resume_refuses_other_fingerprint_or_batch(tmp_path):
    run(ToyStage(), make_config(tmp_path, 5))
    stage = ToyStage(width=16)
    with pytest.raises(BrushworkError, match="configured differently.*width: 32 -> 16"):
        run(stage, make_config(tmp_path, 10, resume=True))
    assert stage.calls == 0
    with pytest.raises(BrushworkError, match="batch_size=16, now batch_size=32"):
        run(ToyStage(), make_config(tmp_path, 10, resume=True, batch_size=32))
    with pytest.raises(BrushworkError, match="seed"):
        run(ToyStage(), make_config(tmp_path, 10, resume=True, seed=1))


def test_resume_after_nan_from_last_good_checkpoint(tmp_path):
    with pytest.raises(BrushworkError, match="step-00000010"):
        run(ToyStage(nan_at_call=13), make_config(tmp_path, 20, checkpoint_every=10))
    result = run(ToyStage(), make_config(tmp_path, 20, checkpoint_every=10, resume=True))
    steps = [json.loads(x)["step"] for x in result.log_path.read_text().splitlines()]
    assert steps == list(range(1, 21))  # the records of steps 11.. from the failed run were dropped
    assert all(torch.isfinite(p).all() for p in result.modules["net"].parameters())
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000010", "step-00000020"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated weights": lambda checkpoint: _truncate(checkpoint / "net.safetensors"),
    "truncated training state": lambda checkpoint: _truncate(checkpoint / "training_state.pt"),
    "empty EMA file": lambda checkpoint: (checkpoint / "ema-net.safetensors").write_bytes(b""),
    "deleted state.json": lambda checkpoint: (checkpoint / "state.json").unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_passes_over_a_damaged_latest_checkpoint(tmp_path, capsys, damage):
    reference = run(ToyStage(**RANDOM), make_config(tmp_path, 10, ema_decay=0.9))
    latest = tmp_path / "checkpoints" / "step-00000010"
    DAMAGE[damage](latest)
    assert checkpoint_problem(latest, ["net"], ema=True)[0] is not None
    capsys.readouterr()

    stage = ToyStage(**RANDOM)
    resumed = run(stage, make_config(tmp_path, 10, ema_decay=0.9, resume=True))
    out = capsys.readouterr().out
    assert "checkpoint step-00000010 is damaged" in out and "resuming from step-00000005" in out, out
    assert stage.calls == 5 and resumed.step == 10
    assert torch.equal(resumed.modules["net"][0].weight, reference.modules["net"][0].weight)
    assert [c.name for c in checkpoint_folders(tmp_path)] == ["step-00000005", "step-00000010"]
    assert checkpoint_problem(latest, ["net"], ema=True)[0] is None  # written again


def test_resume_without_an_intact_checkpoint_is_one_error(tmp_path):
    run(ToyStage(), make_config(tmp_path, 10))
    DAMAGE["truncated weights"](tmp_path / "checkpoints" / "step-00000010")
    DAMAGE["deleted state.json"](tmp_path / "checkpoints" / "step-00000005")
    stage = ToyStage()
    with pytest.raises(BrushworkError, match=r"No intact checkpoint .*step-00000010 is damaged: net.safetensors is "
                                             r"unreadable .*step-00000005 is damaged: state.json is missing"):
        run(stage, make_config(tmp_path, 10, resume=True))
    assert stage.calls == 0
    with pytest.raises(BrushworkError, match="already holds checkpoints"):
        run(ToyStage(), make_config(tmp_path, 10))
