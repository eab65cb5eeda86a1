"""Bulk generation: prompt files, the manifest, and `brushwork generate --ray` on a local Ray cluster."""

import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sd_tiny import add_tiny_clip, build_tiny_sd
from typer.testing import CliRunner

from brushwork.bulk import ray_run
from brushwork.bulk.jobs import Defaults, plan_jobs, read_manifest
from brushwork.cli import app
from brushwork.pnginfo import read_parameters_text

runner = CliRunner()
SMALL = ["--steps", "3", "--height", "32", "--width", "32"]
ROWS = [
    {"prompt": "a red circle", "seed": 11, "negative": "blue", "steps": 2, "guidance": 3.0},
    {"prompt": "a blue square"},
    {"prompt": "a green triangle", "seed": 5, "guidance": 0},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "shapes-tiny", "v1", seed=1)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def generate(*args, model):
    return runner.invoke(app, ["generate", *args, "--model", str(model), *SMALL])


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path), dtype=np.int16)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_prompt_files_give_the_same_jobs_and_name_bad_rows(tmp_path):
    defaults = Defaults(seed=100, negative="grey", steps=4, guidance=5.0, model="shapes")
    jsonl = write_jsonl(tmp_path / "p.jsonl", ROWS)
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    jobs, bad, unknown = plan_jobs(jsonl, defaults, per_row=2)
    assert (bad, unknown) == ([], [])
    assert [(j.index, j.row, j.seed) for j in jobs] == [(0, 1, 11), (1, 1, 12), (2, 2, 102), (3, 2, 103),
                                                         (4, 3, 5), (5, 3, 6)]
    assert (jobs[0].negative, jobs[0].steps, jobs[0].guidance) == ("blue", 2, 3.0)
    assert (jobs[2].negative, jobs[2].steps, jobs[2].guidance, jobs[2].model) == ("grey", 4, 5.0, "shapes")
    assert plan_jobs(parquet, defaults, per_row=2)[0] == jobs

    broken = write_jsonl(tmp_path / "bad.jsonl", [ROWS[1], "{not json", {"prompt": "x", "steps": 0},
                                                  {"seed": 1}, {"prompt": "y", "guidance": "high", "sede": 3}, "[1]"])
    jobs, bad, unknown = plan_jobs(broken, defaults)
    assert [j.index for j in jobs] == [0]
    assert [row for row, _ in bad] == [2, 3, 4, 5, 6]
    assert "not JSON" in bad[0][1] and "steps must be from 1" in bad[1][1] and "no prompt" in bad[2][1]
    assert "guidance" in bad[3][1] and "not a JSON object" in bad[4][1] and unknown == ["sede"]


def test_bad_input_is_a_clean_error(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], {"prompt": "x", "steps": -1}])
    cases = [
        (["--prompts", str(prompts), "-o", "out"], "read by --ray"),
        (["--prompts", str(prompts), "-o", "out", "--ray", "local"], "row 2: steps must be from 1"),
        (["a prompt", "-o", "out", "--ray", "local"], "--prompts FILE only"),
        (["--prompts", str(prompts), "-o", "x.png", "--ray", "local"], "give -o DIR"),
        (["--prompts", str(prompts), "-o", "out", "--ray", "local", "--bad-rows", "maybe"], "stop or skip"),
        (["--prompts", str(prompts), "-o", "out", "--ray", "nowhere"], "HOST:PORT"),
        (["--prompts", str(prompts), "-o", "out", "--ray", "local", "-n", "0"], "-n must be positive"),
    ]
    for args, message in cases:
        result = generate(*args, model=model_dir)
        assert result.exit_code == 1 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()   # a bad row stops the run before anything is written

    monkeypatch.setitem(sys.modules, "ray", None)   # Ray not installed
    result = generate("--prompts", str(prompts), "-o", "out", "--ray", "local", model=model_dir)
    assert result.exit_code == 1 and "pip install 'brushwork[ray]'" in result.output


@pytest.mark.parametrize("address", [
    "127.0.0.1:9",   # refused at once
    # not routed: the connection times out, or (behind a proxy that accepts every connection) Ray gives up
    pytest.param("10.255.255.1:6379", marks=pytest.mark.slow),
])
def test_an_unreachable_cluster_is_a_clean_error_within_30_s(model_dir, tmp_path, address):
    pytest.importorskip("ray")
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS)
    started = time.monotonic()
    result = generate("--prompts", str(prompts), "-o", str(tmp_path / "out"), "--ray", address, model=model_dir)
    assert result.exit_code == 1 and f"Ray cluster at {address}" in result.output
    assert time.monotonic() - started < 30


def test_a_full_disk_stops_with_the_manifest_intact(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    settings = ray_run.Settings(out=str(out), model=str(model_dir), height=32, width=32, batch_size=2)
    jobs, _, _ = plan_jobs(write_jsonl(tmp_path / "p.jsonl", ROWS), Defaults(steps=2))
    writer = ray_run.GroupWriter(vars(settings))
    writer.run_group(jobs[:2])
    before = read_manifest(out)
    assert before.column("file").to_pylist() == ["00000.png", "00001.png"]

    def full(image, path, parameters):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("brushwork.pnginfo.save_png", full)
    batch = pa.table({"jobs": [json.dumps([vars(job) for job in jobs[2:]])]})
    records = writer(batch).to_pylist()
    assert len(records) == 1 and "No space left on device" in records[0]["error"]
    assert read_manifest(out).equals(before)
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "manifest"]   # no half files
    assert not [p for p in (out / "manifest").iterdir() if p.suffix != ".parquet"]


@pytest.mark.slow   # about 40 s on 2 shared cores (actors start, import torch and load the model twice)
def test_ray_images_equal_brushwork_generate_and_a_rerun_makes_only_what_is_missing(model_dir, tmp_path,
                                                                                    ray_cluster):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n\na green triangle\nthree yellow circles\na purple square\n")
    local, bulk = tmp_path / "local", tmp_path / "bulk"
    done = generate("--prompts", str(prompts), "--seed", "3", "--batch-size", "2", "-o", f"{local}/", model=model_dir)
    assert done.exit_code == 0, done.output
    done = generate("--prompts", str(prompts), "--seed", "3", "--batch-size", "2", "-o", str(bulk), "--ray", "auto",
                    "--actors", "2", model=model_dir)
    assert done.exit_code == 0, done.output
    assert "images/s" in done.output

    names = [f"{i:05d}.png" for i in range(5)]
    for name in names:
        assert np.array_equal(pixels(local / name), pixels(bulk / name)), name
        assert read_parameters_text(local / name) == read_parameters_text(bulk / name)
    manifest = read_manifest(bulk).sort_by("index").to_pylist()
    assert [r["file"] for r in manifest] == names and [r["seed"] for r in manifest] == [3, 4, 5, 6, 7]
    assert [r["row"] for r in manifest] == [1, 2, 4, 5, 6] and manifest[3]["prompt"] == "three yellow circles"
    assert all(r["model_hash"] and r["time"] and r["error"] is None for r in manifest)

    # A group that was being made when a worker or the driver died: its images may be there, its record is not.
    (bulk / "manifest" / "group-000000002.parquet").unlink()
    (bulk / "00003.png").unlink()
    again = generate("--prompts", str(prompts), "--seed", "3", "--batch-size", "2", "-o", str(bulk), "--ray", "auto",
                     model=model_dir)
    assert again.exit_code == 0, again.output
    assert "3 of 5 images are in the manifest already" in again.output and "2 images in" in again.output
    assert read_manifest(bulk).num_rows == 5
    for name in names:
        assert np.array_equal(pixels(local / name), pixels(bulk / name)), name


@pytest.mark.slow
def test_rows_with_their_own_settings_equal_single_images_and_bad_rows_are_skipped(model_dir, tmp_path,
                                                                                   ray_cluster):
    prompts = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], {"prompt": "x", "guidance": -1}, ROWS[2]])
    out = tmp_path / "bulk"
    done = generate("--prompts", str(prompts), "-o", str(out), "--ray", "auto", "--batch-size", "1",
                    "--bad-rows", "skip", model=model_dir)
    assert done.exit_code == 0, done.output
    assert "skipping 1 bad row(s)" in done.output and "row 2: guidance" in done.output
    single = tmp_path / "single.png"
    alone = runner.invoke(app, ["generate", "a red circle", "--seed", "11", "--negative", "blue", "--guidance", "3",
                                "--steps", "2", "--height", "32", "--width", "32", "--model", str(model_dir),
                                "-o", str(single)])
    assert alone.exit_code == 0, alone.output
    assert np.array_equal(pixels(single), pixels(out / "00000.png"))
    assert read_parameters_text(single) == read_parameters_text(out / "00000.png")
    manifest = read_manifest(out)
    errors = manifest.filter(pa.compute.is_valid(manifest.column("error"))).to_pylist()
    assert [(r["row"], r["index"]) for r in errors] == [(2, None)] and "guidance" in errors[0]["error"]
    assert sorted(manifest.column("file").drop_null().to_pylist()) == ["00000.png", "00002.png"]


@pytest.mark.slow
def test_a_model_the_actors_cannot_load_fails_the_run_once(model_dir, tmp_path, ray_cluster):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    prompts = write_jsonl(tmp_path / "p.jsonl", [ROWS[1], {"prompt": "a red circle", "model": str(broken)}])
    done = generate("--prompts", str(prompts), "-o", str(tmp_path / "out"), "--ray", "auto", "--batch-size", "1",
                    "--actors", "1", model=model_dir)
    assert done.exit_code == 1
    assert f"cannot load model {broken}" in done.output and done.output.count("Error:") == 1


@pytest.mark.slow
def test_eval_on_ray_scores_the_same_images(tmp_path, ray_cluster):
    model = add_tiny_clip(build_tiny_sd(tmp_path / "tiny"))
    common = ["eval", "--model", str(model), "--data", "shapes", "--n", "2", "--steps", "2", "--per-prompt", "2",
              "--batch-sizes", ""]
    local = runner.invoke(app, [*common, "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    bulk = runner.invoke(app, [*common, "--out", str(tmp_path / "bulk"), "--ray", "auto", "--actors", "1"])
    assert bulk.exit_code == 0, bulk.output
    reports = [json.loads((tmp_path / name / "report.json").read_text())["models"][0] for name in ("local", "bulk")]
    for key in ("fid", "clip_score", "intra_prompt_diversity", "faithfulness"):
        assert reports[1]["metrics"][key] == pytest.approx(reports[0]["metrics"][key]), key
    folder = tmp_path / "bulk" / "images" / "0-seed0-steps2-guidance5-default"
    assert read_manifest(folder).num_rows == 16


@pytest.mark.slow   # starts two local Ray clusters
def test_a_killed_driver_loses_no_recorded_image_and_a_rerun_finishes(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{color} {shape}\n" for color in ("a red", "a blue", "a green")
                               for shape in ("circle", "square", "triangle")))
    out = tmp_path / "bulk"
    command = [sys.executable, "-m", "brushwork.cli", "generate", "--prompts", str(prompts), "-o", str(out), "--ray",
               "local", "--batch-size", "1", "--actors", "1", "--seed", "3", "--model", str(model_dir), *SMALL]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while len(list(out.glob("manifest/group-*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    driver.kill()
    driver.wait()
    # The killed driver's actor may still finish the group it holds (a whole group or nothing) before its local
    # cluster notices: read the manifest once it has been still for a few seconds.
    settled, count = time.monotonic(), -1
    while time.monotonic() - settled < 5 and time.monotonic() < deadline + 60:
        now = len(list(out.glob("manifest/group-*.parquet")))
        if now != count:
            settled, count = time.monotonic(), now
        time.sleep(0.2)
    recorded = read_manifest(out).column("file").drop_null().to_pylist()
    assert 2 <= len(recorded) < 9
    for name in recorded:
        PIL.Image.open(out / name).load()   # whole files only

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(recorded)} of 9 images are in the manifest already" in again.stderr
    assert read_manifest(out).column("file").drop_null().to_pylist() == [f"{i:05d}.png" for i in range(9)]
    local = tmp_path / "local"
    done = generate("--prompts", str(prompts), "--seed", "3", "--batch-size", "1", "-o", f"{local}/", model=model_dir)
    assert done.exit_code == 0, done.output
    for i in range(9):
        assert np.array_equal(pixels(local / f"{i:05d}.png"), pixels(out / f"{i:05d}.png")), i
