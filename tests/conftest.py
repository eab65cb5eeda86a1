
import pytest
import torch

# Tiny test models gain nothing from a second thread; one keeps runs steady when the cores are shared.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Nothing in the tests may reach a hub: the machine has no network beyond package registries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
