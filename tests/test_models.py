import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPModel

from brushwork.errors import BrushworkError
from brushwork.models.clip import load_clip, vision_only_state
from brushwork.models.sizes import SIZES, build_clip, build_unet, build_vae, count_parameters, get_size
from brushwork.train.stages import text_encoder_from_clip


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
    # compact: small's VAE and vision tower, a thinner text tower and UNet (a second shipped model's bytes)
    assert counts["compact"]["vae"] == counts["small"]["vae"]
    assert counts["compact"]["clip_text"] < 0.7 * counts["small"]["clip_text"]
    assert counts["compact"]["unet"] < 0.7 * counts["small"]["unet"]


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
    with pytest.raises(BrushworkError, match="tiny, compact, small, base"):
        get_size("huge")


def test_clip_stored_without_its_text_tower_loads_back_whole(tmp_path):
    torch.manual_seed(0)
    clip = build_clip(get_size("tiny"), 600).eval()
    clip.save_pretrained(tmp_path / "clip")
    text_encoder_from_clip(clip).save_pretrained(tmp_path / "text_encoder")
    assert all(key.startswith("text_model.") for key in
               set(clip.state_dict()) - set(vision_only_state(tmp_path / "clip")))
    shutil.copytree(tmp_path / "clip", tmp_path / "whole")
    save_file(vision_only_state(tmp_path / "clip"), tmp_path / "clip" / "model.safetensors")
    assert vision_only_state(tmp_path / "clip").keys() == load_file(tmp_path / "clip" / "model.safetensors").keys()

    loaded = load_clip(tmp_path / "clip")
    assert isinstance(loaded, CLIPModel)
    for name, tensor in clip.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(load_clip(tmp_path / "whole").state_dict()["logit_scale"], clip.state_dict()["logit_scale"])

    with pytest.raises(BrushworkError, match="differs"):   # only a text tower equal to text_encoder/ may go
        other = build_clip(get_size("tiny"), 600, seed=1)
        text_encoder_from_clip(other).save_pretrained(tmp_path / "text_encoder")
        vision_only_state(tmp_path / "whole")
    shutil.rmtree(tmp_path / "text_encoder")
    with pytest.raises(BrushworkError, match="only CLIP's vision tower"):
        load_clip(tmp_path / "clip")


def test_initial_weights_come_from_the_seed_alone():
    size = get_size("tiny")
    torch.manual_seed(123)
    state = build_unet(size, seed=7).state_dict()
    after = torch.rand(1)
    torch.manual_seed(999)   # the caller's random state neither matters nor changes
    again = build_unet(size, seed=7).state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)
    other = build_unet(size, seed=8).state_dict()
    assert not all(torch.equal(state[k], other[k]) for k in state)
    for build in (lambda seed: build_vae(size, seed=seed), lambda seed: build_clip(size, 600, seed=seed)):
        first, second = build(3).state_dict(), build(3).state_dict()
        assert all(torch.equal(first[k], second[k]) for k in first)


def test_gan_initial_weights_come_from_the_seed_alone():
    from brushwork.models.gan import build_discriminator, build_generator

    for build in (build_generator, build_discriminator):
        torch.manual_seed(1)
        first = build("tiny", 32, seed=5).state_dict()
        torch.manual_seed(2)
        second = build("tiny", 32, seed=5).state_dict()
        assert all(torch.equal(first[k], second[k]) for k in first)
        other = build("tiny", 32, seed=6).state_dict()
        assert not all(torch.equal(first[k], other[k]) for k in first)
