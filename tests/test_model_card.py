"""The shipped models' cards carry the Hub's metadata (what `brushwork train` now writes)."""

import pytest
from huggingface_hub import ModelCard

from brushwork.generation.registry import resolve_model


@pytest.mark.parametrize("name, library, license", [("shapes", "diffusers", "apache-2.0"),
                                                     ("emoji", "diffusers", "cc-by-sa-4.0"),
                                                     ("shapes-gan", "brushwork", "apache-2.0")])
def test_shipped_cards_have_hub_metadata(name, library, license):
    card = ModelCard.load(resolve_model(name) / "README.md")
    assert card.data.library_name == library and card.data.license == license
    assert card.data.pipeline_tag == "text-to-image" and "brushwork" in card.data.tags
    assert card.text.lstrip().startswith("# ")
