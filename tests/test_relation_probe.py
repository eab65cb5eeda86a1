import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from brushwork.eval.relation_probe import KINDS, probe_unet, relation_near_misses
from brushwork.generation.auto import BrushworkPipeline

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "relation_probe.py"


@pytest.mark.slow   # trains a discriminator; the UNet probe below, which eval runs, stays in the default run
def test_relation_probe_reports_held_out_accuracy_for_each_kind_of_relation_near_miss():
    result = subprocess.run([sys.executable, str(SCRIPT), "--model", "shapes", "--steps", "2", "--every", "1",
                             "--images", "100", "--batch-size", "4"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 1", "step 2"]
    for line in lines:
        match = re.search(r"opposite relation (\d\.\d\d), perpendicular relation (\d\.\d\d), objects swapped (\d\.\d\d)", line)
        assert match and all(0.0 <= float(value) <= 1.0 for value in match.groups())
    assert re.search(r"^100 training and 10 held-out position images", result.stdout)


def test_relation_near_misses_are_named_by_what_changed():
    assert relation_near_misses("a red circle above a blue square") == {
        "opposite relation": "a red circle below a blue square",
        "perpendicular relation": "a red circle left of a blue square",
        "objects swapped": "a blue square above a red circle"}


def test_unet_relation_probe_scores_each_kind_of_near_miss_against_the_own_caption():
    model = BrushworkPipeline.from_pretrained("shapes", device="cpu").model
    probe = probe_unet(model, images=6, timesteps=(500, 800), batch_size=4)
    assert probe["images"] == 6 and probe["timesteps"] == [500, 800]
    for t in ("500", "800"):
        shares = probe["shares"][t]
        assert list(shares) == list(KINDS)
        assert all(abs(share * 6 - round(share * 6)) < 1e-9 for share in shares.values())   # k of 6 scenes
        assert probe["weakest_relation"][t] == min(shares[kind] for kind in KINDS[:3])
    assert probe["shares"]["500"]["colour (control)"] >= 4 / 6   # the shipped model knows its colours


def test_a_unet_that_ignores_its_text_wins_no_comparison():
    """Equal errors are no win: a UNet blind to the caption scores 0 against every near miss, never 0.5 by ties."""
    model = BrushworkPipeline.from_pretrained("shapes", device="cpu").model
    forward = model.unet.forward
    model.unet.forward = lambda sample, t, encoder_hidden_states, **kwargs: forward(
        sample, t, encoder_hidden_states=torch.zeros_like(encoder_hidden_states), **kwargs)
    probe = probe_unet(model, images=3, timesteps=(800,))
    assert probe["shares"]["800"] == dict.fromkeys(KINDS, 0.0)
