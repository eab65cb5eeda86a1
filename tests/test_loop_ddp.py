"""Two CPU processes (torchrun, gloo) follow the loss curve of one process at the same global batch."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loop_toy import ToyStage, make_config
from safetensors.torch import load_file

from brushwork.train.loop import run

TOY = Path(__file__).with_name("loop_toy.py")
STEPS = 12


needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _toy(out: Path) -> list[str]:
    return [str(TOY), "--out", str(out), "--steps", str(STEPS), "--batch-size", "16", "--checkpoint-every", "6"]


def _assert_follows_one_process(out: Path, tmp_path: Path) -> None:
    """The 2-process run in out has the loss curve and weights of one process at the same global batch."""
    # one process, 2 micro-batches of 8 = the same partition of each global batch of 16
    single = run(ToyStage(), make_config(tmp_path / "single", STEPS, batch_size=16, grad_accum=2,
                                         checkpoint_every=6))

    state = json.loads((out / "checkpoints" / f"step-{STEPS:08d}" / "state.json").read_text())
    assert state["num_processes"] == 2
    ddp_log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    single_log = [json.loads(x) for x in single.log_path.read_text().splitlines()]
    assert [r["step"] for r in ddp_log] == list(range(1, STEPS + 1))
    # Tolerances: per-step loss 1e-5 relative, weights 1e-6 absolute (measured: identical on this machine).
    assert [r["loss"] for r in ddp_log] == pytest.approx([r["loss"] for r in single_log], rel=1e-5)
    assert [r["mae"] for r in ddp_log] == pytest.approx([r["mae"] for r in single_log], rel=1e-5)
    ddp_weights = load_file(out / "checkpoints" / f"step-{STEPS:08d}" / "net.safetensors")
    for key, value in load_file(single.checkpoint / "net.safetensors").items():
        torch.testing.assert_close(ddp_weights[key], value, rtol=0, atol=1e-6)


@needs_gloo
def test_two_processes_match_one(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *_toy(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    _assert_follows_one_process(out, tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_gloo
def test_two_nodes_with_c10d_rendezvous_match_one_process(tmp_path):
    """`torchrun --nnodes 2` as on two machines: each "node" is its own torchrun, meeting at a c10d rendezvous
    endpoint (here on localhost, on a cluster the first node's address)."""
    out = tmp_path / "nodes"
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", "--rdzv_id", "brushwork-test",
            "--local_addr", "127.0.0.1", *_toy(out)]
    nodes = [subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [node.communicate(timeout=180)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    _assert_follows_one_process(out, tmp_path)


@pytest.mark.slow   # about a minute on 2 shared cores
@needs_gloo
def test_the_train_command_under_torchrun_is_one_run_on_two_processes(tmp_path):
    """The CLI's recipe asks accelerate who is the main process before the loop sets up DDP; on a CPU that first
    question must already open the gloo group, or each process trains alone and they collide on the folder."""
    config = tmp_path / "tiny.toml"
    config.write_text("n = 32\n")   # torchrun's own parser would take a --n flag for one of its options
    out = tmp_path / "model"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "brushwork.cli", "train", "clip", "--data", "shapes", "--size", "tiny", "--config", str(config),
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    checkpoints = sorted((out.parent / "model.runs" / "clip" / "checkpoints").iterdir())
    assert json.loads((checkpoints[-1] / "state.json").read_text())["num_processes"] == 2
    assert (out / "text_encoder").is_dir()
