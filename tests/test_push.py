"""`brushwork push`: what would be uploaded (dry run), what is refused, and the upload through a local stand-in
for huggingface_hub's HfApi (the machine reaches no Hub)."""

import pytest
from sd_tiny import build_tiny_sd
from typer.testing import CliRunner

from brushwork.cli import app

runner = CliRunner()


@pytest.fixture()
def model(tmp_path):
    folder = build_tiny_sd(tmp_path / "tiny")
    (folder / ".write-test-1").write_bytes(b"")  # hidden files stay home
    return folder


def test_dry_run_lists_what_would_be_uploaded(model):
    result = runner.invoke(app, ["push", str(model), "me/tiny", "--dry-run"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[-1] for line in result.output.splitlines()[:-1]]
    assert "model_index.json" in listed and "unet/diffusion_pytorch_model.safetensors" in listed
    assert not any(name.startswith(".") for name in listed)
    assert result.output.splitlines()[-1].startswith(f"{len(listed)} files, ")


@pytest.mark.parametrize("make, message", [
    (lambda m: (m / "runs" / "unet").mkdir(parents=True), "holds runs/"),
    (lambda m: (m / "unet" / "optimizer.pt").write_bytes(b"x"), "pickle files, which run code when loaded: unet/optimizer.pt"),
    (lambda m: (m / "model_index.json").unlink(), "not a model folder"),
])
def test_runs_pickles_and_non_models_are_refused(model, make, message):
    make(model)
    for extra in (["--dry-run"], []):
        result = runner.invoke(app, ["push", str(model), "me/tiny", *extra])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_push_creates_the_repo_and_uploads_the_listed_files(model, monkeypatch):
    import huggingface_hub

    calls = []

    class RecordingHfApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return "https://hub.example/me/tiny/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    result = runner.invoke(app, ["push", str(model), "me/tiny", "--private", "--token", "hf_x"])
    assert result.exit_code == 0, result.output
    assert "uploaded" in result.output and "commit/abc" in result.output
    assert calls[0] == ("token", "hf_x")
    assert calls[1] == ("create_repo", "me/tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    upload = calls[2][1]
    assert upload["repo_id"] == "me/tiny" and "model_index.json" in upload["allow_patterns"]
    assert not any(name.startswith(".") for name in upload["allow_patterns"])

    def refuse(self, **kwargs):
        raise RuntimeError("401 Unauthorized: invalid token")

    monkeypatch.setattr(RecordingHfApi, "upload_folder", refuse)
    result = runner.invoke(app, ["push", str(model), "me/tiny"])
    assert result.exit_code == 1 and "Error: push to me/tiny failed: 401 Unauthorized" in result.output
