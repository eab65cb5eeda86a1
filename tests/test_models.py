import pytest
import torch

from brushwork.errors import BrushworkError
from brushwork.models.sizes import SIZES, build_clip, build_unet, build_vae, count_parameters, get_size


def _counts(name: str) -> dict[str, int]:
    size = get_size(name)
    with torch.device("meta"):   # parameter counts without allocating the large sizes
        clip, vae, unet = build_clip(size, 4096), build_vae(size), build_unet(size)
    return {"clip_text": count_parameters(clip.text_model), "clip_vision": count_parameters(clip.vision_model),
            "vae": count_parameters(vae), "unet": count_parameters(unet)}


def test_sizes_grow_and_tiny_is_tiny():
    counts = {name: _counts(name) for name in SIZES}
    for name, parts in counts.items():
        print(name, {k: f"{v / 1e6:.2f}M" for k, v in parts.items()})
    assert sum(counts["tiny"].values()) < 1_000_000
    assert 2e6 < counts["small"]["unet"] < 10e6   # trainable on a 2-core CPU in hours
    for part in counts["tiny"]:
        assert counts["tiny"][part] < counts["small"][part] < counts["base"][part]


def test_tiny_models_fit_together():
    size = get_size("tiny")
    clip, vae, unet = build_clip(size, 600), build_vae(size), build_unet(size)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample()
        assert latents.shape == (2, 4, 16, 16) == (2, 4, size.latent_size, size.latent_size)
        assert vae.decode(latents).sample.shape == images.shape
        hidden = clip.text_model(torch.randint(0, 600, (2, 77))).last_hidden_state
        assert unet(latents, torch.tensor([10, 500]), hidden).sample.shape == latents.shape
        assert clip(input_ids=torch.randint(0, 600, (2, 5)), pixel_values=images).logits_per_text.shape == (2, 2)
    assert clip.config.text_config.eos_token_id == 599 and clip.config.text_config.bos_token_id == 598


def test_cross_attention_only_below_full_latent_resolution():
    for size in SIZES.values():
        assert size.unet["down_block_types"][0] == "DownBlock2D"
        assert size.unet["up_block_types"][-1] == "UpBlock2D"


def test_unknown_size_lists_the_known_ones():
    with pytest.raises(BrushworkError, match="tiny, small, base"):
        get_size("huge")
