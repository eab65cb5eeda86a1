"""--report-to: TensorBoard event files with the loss, lr and sample grids (offline); wandb refused when absent."""

import json

import pytest
from loop_toy import ToyStage, make_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from brushwork.errors import BrushworkError
from brushwork.train import loop
from brushwork.train.loop import run


def test_tensorboard_gets_losses_lr_and_sample_grids(tmp_path):
    out = tmp_path / "runs" / "toy"
    run(ToyStage(), make_config(out, 6, log_every=2, sample_every=3, report_to="tensorboard"))
    assert list(out.glob("events.out.tfevents.*")), sorted(p.name for p in out.iterdir())
    events = EventAccumulator(str(out), size_guidance={"images": 0}).Reload()
    assert {"loss", "lr", "grad_norm"} <= set(events.Tags()["scalars"])
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]   # as before
    assert [event.step for event in events.Scalars("loss")] == [record["step"] for record in logged] == [2, 4, 5, 6]
    assert [event.value for event in events.Scalars("loss")] == pytest.approx([r["loss"] for r in logged])
    assert [event.step for event in events.Images("samples")] == [3, 6]


def test_no_trackers_by_default(tmp_path):
    run(ToyStage(), make_config(tmp_path, 2))
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_unknown_or_missing_tracker_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(BrushworkError, match="--report-to must be one of none, tensorboard, wandb, all"):
        run(ToyStage(), make_config(tmp_path, 2, report_to="mlflow"))
    monkeypatch.setattr("accelerate.utils.is_wandb_available", lambda: False)
    with pytest.raises(BrushworkError, match="--report-to all needs wandb, which is not installed: pip install wandb"):
        loop.check_report_to("all")
