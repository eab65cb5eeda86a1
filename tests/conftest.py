import os

import pytest
import torch

# Two vCPUs here; more threads than that only adds contention in small test models.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Nothing in the tests may reach a hub: the machine has no network beyond package registries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
