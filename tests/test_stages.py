import json
import math
from types import SimpleNamespace

import pytest
import torch

from brushwork.data.captions import all_captions, contradictions_by_direction_and_axis, contradictions_by_kind
from brushwork.data.dataset import open_dataset
from brushwork.errors import BrushworkError
from brushwork.models.sizes import build_clip, build_unet, build_vae, get_size
from brushwork.tokenizer import train_tokenizer
from brushwork.train.loop import TrainConfig, run
from brushwork.train.stages import (NEAR_MISS_MARGIN, NEAR_MISS_SEPARATION, ClipStage, UnetStage, VaeStage,
                                    inference_scheduler, near_miss_texts, noise_schedule, normalize_latents,
                                    text_encoder_from_clip)

SIZE = get_size("tiny")



@pytest.fixture(scope="module")
def data():
    return open_dataset("shapes", n=32)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(all_captions(), tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture()
def unet_stage(data, tokenizer):
    torch.manual_seed(0)
    clip = build_clip(SIZE, len(tokenizer))
    vae = build_vae(SIZE)
    return UnetStage(data, build_unet(SIZE), text_encoder_from_clip(clip), tokenizer, vae)


def _losses(log_path):
    return [json.loads(line)["loss"] for line in log_path.read_text().splitlines()]


def test_clip_treats_repeated_captions_as_positives(tokenizer, data):
    stage = ClipStage(data, tokenizer, build_clip(SIZE, len(tokenizer)))
    batch = stage.collate([data[0], data[1], dict(data[2], text=data[0]["text"])])
    assert batch["caption_group"].tolist() == [0, 1, 0]

    class Oracle(torch.nn.Module):   # scores exactly the pairs that share a caption high
        logit_scale = torch.nn.Parameter(torch.tensor(1.0))

        def forward(self, input_ids, pixel_values):
            same = batch["caption_group"][:, None] == batch["caption_group"][None, :]
            return SimpleNamespace(logits_per_image=same.float() * 30.0)

    loss, metrics = stage.loss("main", {"clip": Oracle()}, batch, torch.Generator())
    # Rows 0 and 2 spread their target over two equal captions: the minimum is the targets' entropy.
    assert loss.item() == pytest.approx(2 / 3 * math.log(2), abs=1e-4)
    assert metrics["accuracy"].item() == 1.0


def test_near_miss_texts_draw_one_per_kind_for_a_share_of_the_captions():
    texts = ["a red circle above a blue square", "two green triangles", "a photo of my cat"]
    assert near_miss_texts(texts, 0.0, torch.Generator().manual_seed(0)) == ([], [])
    near_misses, owners = near_miss_texts(texts, 1.0, torch.Generator().manual_seed(0))
    assert owners == [0, 0, 0, 0, 1, 1, 1]     # shape, colour, direction, axis; shape, colour, count; none for the cat
    for near_miss, owner in zip(near_misses, owners):
        assert any(near_miss in captions for captions in contradictions_by_kind(texts[owner]).values())
    assert {kind for kind, captions in contradictions_by_direction_and_axis(texts[0]).items()
            if set(captions) & set(near_misses[:4])} == {"shape", "color", "direction", "axis"}
    assert near_miss_texts(texts, 1.0, torch.Generator().manual_seed(0)) == (near_misses, owners)
    draws = [near_miss_texts(texts, 1.0, torch.Generator().manual_seed(seed))[0][2:4] for seed in range(40)]
    # every position image meets the other direction (the word or the order) and a perpendicular relation
    assert {d[0] for d in draws} == {"a red circle below a blue square", "a blue square above a red circle"}
    assert len({d[1] for d in draws}) == 4 and all(" of " in d[1] for d in draws)   # left of / right of, either order
    drawn = len(near_miss_texts(texts[:2] * 50, 0.5, torch.Generator().manual_seed(1))[1])
    assert 100 < drawn < 250                      # about half of the 100 captions, three or four near misses each


def test_clip_near_misses_are_negatives_of_their_image(tokenizer, data):
    stage = ClipStage(data, tokenizer, build_clip(SIZE, len(tokenizer)), hard_negatives=1.0)
    items = [data[i] for i in range(4)]
    batch = stage.collate(items)
    near_misses, owners = near_miss_texts(batch["texts"], 1.0, torch.Generator().manual_seed(3))
    seen = {}

    class Oracle(torch.nn.Module):   # own caption 30, the image's near misses `near`, everything else 0
        logit_scale = torch.nn.Parameter(torch.tensor(1.0))
        near = 30.0
        same_text = False            # text embeddings: all equal, or one orthogonal direction per text

        def forward(self, input_ids, pixel_values):
            seen["columns"] = len(input_ids)
            logits = torch.zeros(len(pixel_values), len(input_ids))
            logits[:, :4] = (batch["caption_group"][:, None] == batch["caption_group"][None, :]).float() * 30.0
            for column, owner in enumerate(owners):
                logits[owner, 4 + column] = self.near
            text_embeds = torch.ones(len(input_ids), 1) if self.same_text else torch.eye(len(input_ids))
            return SimpleNamespace(logits_per_image=logits, text_embeds=text_embeds)

    oracle = Oracle()
    loss, metrics = stage.loss("main", {"clip": oracle}, batch, torch.Generator().manual_seed(3))
    assert seen["columns"] == 4 + len(near_misses) and len(near_misses) >= 8
    groups = batch["caption_group"].tolist()
    positives = [groups.count(g) for g in groups]
    misses = [owners.count(i) for i in range(4)]
    # image -> caption: the target's mass shared with as many near misses scored as high; caption -> image: entropy
    expected = (sum(math.log(p + m) for p, m in zip(positives, misses)) / 4 + sum(math.log(p) for p in positives) / 4) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    assert metrics["near_miss_accuracy"].item() == 0.0 and metrics["near_miss_cosine"].item() == 0.0
    oracle.same_text = True          # the text tower cannot tell a caption from its near misses: hinge 1 - 0.8
    separated = loss.item()
    loss, metrics = stage.loss("main", {"clip": oracle}, batch, torch.Generator().manual_seed(3))
    assert loss.item() == pytest.approx(separated + NEAR_MISS_SEPARATION * (1 - NEAR_MISS_MARGIN), abs=1e-4)
    assert metrics["near_miss_cosine"].item() == pytest.approx(1.0)
    oracle.near = 29.0
    loss, metrics = stage.loss("main", {"clip": oracle}, batch, torch.Generator().manual_seed(3))
    assert metrics["near_miss_accuracy"].item() == 1.0
    assert stage.fingerprint()["hard_negatives"] == 1.0
    assert "hard_negatives" not in ClipStage(data, tokenizer, build_clip(SIZE, len(tokenizer))).fingerprint()
    with pytest.raises(BrushworkError, match="near-miss captions must be in"):
        ClipStage(data, tokenizer, build_clip(SIZE, len(tokenizer)), hard_negatives=1.5)


def test_clip_learns_and_clamps_temperature(tokenizer, data, tmp_path):
    clip = build_clip(SIZE, len(tokenizer))
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)   # exp(10) > 100: the first loss call clamps it
    stage = ClipStage(data, tokenizer, clip)
    result = run(stage, TrainConfig(tmp_path, max_steps=20, batch_size=16, lr=3e-3, log_every=10,
                                    mixed_precision="no"))
    losses = _losses(result.log_path)
    assert losses[-1] < losses[0]
    assert clip.logit_scale.exp().item() <= 100.0 + 1e-3
    image = stage.sample(stage.modules(), 20)
    assert image.size == (8 * 64, 64 + 8 * 64)


def test_vae_trains_on_random_crops_drawn_from_the_step_generator(data, tmp_path):
    stage = VaeStage(data, build_vae(SIZE), crop=32)
    seen = []
    stage.trainable.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    batch = stage.collate([data[i] for i in range(8)])
    for seed in (0, 0, 1):
        stage.loss("main", stage.modules(), batch, torch.Generator().manual_seed(seed))
    assert seen[0].shape == (8, 3, 32, 32)
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])   # the generator places them
    for image, crop in zip(batch["pixel_values"], seen[2]):   # each is a window of its own image
        windows = image.unfold(1, 32, 1).unfold(2, 32, 1)     # (3, 33, 33, 32, 32)
        assert (windows == crop[:, None, None]).all(dim=(0, 3, 4)).any()
    whole = VaeStage(data, build_vae(SIZE), crop=None)
    whole.trainable.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    whole.loss("main", whole.modules(), batch, torch.Generator().manual_seed(0))
    assert seen[-1].shape == (8, 3, 64, 64)


def test_vae_trains_and_latents_are_normalised_per_channel(data, tmp_path):
    stage = VaeStage(data, build_vae(SIZE))
    result = run(stage, TrainConfig(tmp_path, max_steps=12, batch_size=8, lr=3e-3, log_every=4, mixed_precision="no"))
    losses = _losses(result.log_path)
    assert losses[-1] < losses[0]
    vae = stage.vae.eval()
    images = torch.stack([data[i]["pixel_values"] for i in range(len(data))])
    with torch.no_grad():
        before = vae.decode(vae.encode(images).latent_dist.mode()).sample
        stats = normalize_latents(vae, data)
        latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
        after = vae.decode(latents / vae.config.scaling_factor).sample
    assert vae.config.scaling_factor == 1.0 and len(stats["mean"]) == len(stats["std"]) == 4
    assert max(abs(m) for m in stats["mean"]) > 0.01   # there was something to normalise
    torch.testing.assert_close(latents.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(latents.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=0)   # the same autoencoder, other coordinates
    again = normalize_latents(vae, data)                             # idempotent: a resumed stage may run it twice
    assert max(abs(m) for m in again["mean"]) < 1e-4 and max(abs(s - 1) for s in again["std"]) < 1e-4
    assert stage.sample(stage.modules(), 12).size == (8 * 64, 2 * 64)


def test_empty_caption_embedding_is_finite_and_cached(unet_stage):
    calls = []
    unet_stage.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    hidden = unet_stage.text_embeddings(["", "a red circle", ""], torch.device("cpu"))
    assert hidden.shape == (3, 77, SIZE.clip_text["hidden_size"])
    assert torch.isfinite(hidden).all()
    assert not torch.equal(hidden[0], hidden[1]) and torch.equal(hidden[0], hidden[2])
    unet_stage.text_embeddings(["a red circle", ""], torch.device("cpu"))
    assert len(calls) == 1


def test_the_latent_cache_encodes_an_item_once_when_first_drawn_and_matches_the_vae(unet_stage, data):
    cache = unet_stage.dataset()
    assert len(cache) == len(data) and not cache.encoded.any()   # nothing is encoded up front
    with torch.no_grad():
        expected = unet_stage.vae.encode(data[3]["pixel_values"][None]).latent_dist.mode()[0]
    expected = expected * unet_stage.vae.config.scaling_factor
    encodes = []
    hook = unet_stage.vae.encoder.register_forward_hook(lambda module, args, out: encodes.append(len(args[0])))
    first = unet_stage.collate([cache[i] for i in (3, 5)])
    latents = unet_stage.batch_latents(first)
    assert encodes == [2] and cache.encoded.sum() == 2
    torch.testing.assert_close(latents[0], expected, atol=2e-3, rtol=2e-3)
    again = [cache[i] for i in (5, 3, 6)]
    assert "pixel_values" not in again[0] and again[1]["text"] == data[3]["text"]   # read, not rendered
    assert torch.equal(unet_stage.batch_latents(unet_stage.collate(again))[:2], latents.flip(0))
    assert encodes == [2, 1]   # only item 6 is new
    # a worker's copy made before the cache filled sends pixels for cached items: they are read, not re-encoded
    stale = unet_stage.collate([data[3] | {"index": 3}, data[7] | {"index": 7}])
    assert torch.equal(unet_stage.batch_latents(stale)[0], latents[0]) and encodes == [2, 1, 1]
    hook.remove()


def test_unet_loss_is_reproducible_and_uncached_path_agrees(unet_stage, data):
    cached = unet_stage.dataset()
    batch = unet_stage.collate([cached[i] for i in range(8)])
    loss_a, _ = unet_stage.loss("main", unet_stage.modules(), batch, torch.Generator().manual_seed(1))
    batch = unet_stage.collate([cached[i] for i in range(8)])    # now read from the cache
    loss_b, _ = unet_stage.loss("main", unet_stage.modules(), batch, torch.Generator().manual_seed(1))
    loss_c, _ = unet_stage.loss("main", unet_stage.modules(), batch, torch.Generator().manual_seed(2))
    assert torch.isfinite(loss_a) and loss_a.item() == loss_b.item() != loss_c.item()
    raw = unet_stage.collate([data[i] for i in range(8)])
    loss_raw, _ = unet_stage.loss("main", unet_stage.modules(), raw, torch.Generator().manual_seed(1))
    assert loss_raw.item() == pytest.approx(loss_a.item(), rel=1e-2)


def test_unet_calls_keep_one_shape_whatever_the_captions(unet_stage):
    # what `--compile` relies on: a new input shape would make dynamo compile again (CLIP's batches do change shape)
    shapes = set()
    hook = unet_stage.unet.register_forward_pre_hook(
        lambda module, args: shapes.add(tuple(tuple(a.shape) for a in args)))
    cached = unet_stage.dataset()
    captions = set()
    try:
        for start, dropout in ((0, 0.1), (8, 0.1), (16, 1.0)):   # the last batch: every caption empty
            unet_stage.caption_dropout = dropout
            batch = unet_stage.collate([cached[i] for i in range(start, start + 8)])
            captions.update(len(unet_stage.tokenizer(t).input_ids) for t in batch["text"])
            unet_stage.loss("main", unet_stage.modules(), batch, torch.Generator().manual_seed(start))
    finally:
        hook.remove()
    assert len(captions) > 1 and len(shapes) == 1, shapes   # captions of several lengths, one call shape


def test_caption_dropout_uses_the_empty_caption(unet_stage):
    seen = []
    original = unet_stage.text_embeddings
    unet_stage.text_embeddings = lambda texts, device: seen.extend(texts) or original(texts, device)
    unet_stage.caption_dropout = 1.0
    batch = unet_stage.collate([unet_stage.dataset()[i] for i in range(4)])
    unet_stage.loss("main", unet_stage.modules(), batch, torch.Generator().manual_seed(0))
    assert seen == [""] * 4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(unet_stage, prediction_type):
    unet_stage.schedule["prediction_type"] = prediction_type
    timesteps = torch.tensor([0, 100, 500, 999])
    weights = unet_stage.loss_weights(timesteps)
    alphas = unet_stage.noise_scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    if prediction_type == "epsilon":
        expected = snr.clamp(max=5.0) / snr
    else:   # v: weight 1 while SNR + 1 <= γ, so the noisiest steps, which set the layout, keep their weight
        expected = (snr + 1).clamp(max=5.0) / (snr + 1)
        assert weights[-1] == 1.0
    torch.testing.assert_close(weights, expected)
    assert weights[0] < 1   # t=0 is nearly noise-free: its huge SNR is clipped to γ
    unet_stage.snr_gamma = None
    assert unet_stage.loss_weights(timesteps).tolist() == [1.0] * 4


def test_unet_trains_with_ema_and_samples(unet_stage, tmp_path):
    unet_stage.sample_steps = 2
    result = run(unet_stage, TrainConfig(tmp_path, max_steps=4, batch_size=8, ema_decay=0.9, log_every=2,
                                         sample_every=4, mixed_precision="no"))
    assert result.ema is not None
    assert all(torch.isfinite(p).all() for p in result.ema["unet"].parameters())
    assert (tmp_path / "samples" / "step-00000004.png").is_file()


def test_zero_terminal_snr_trains_to_pure_noise_and_samples_from_it(data, tokenizer, tmp_path):
    with pytest.raises(BrushworkError, match="needs v_prediction"):
        noise_schedule("scaled_linear", "epsilon", zero_terminal_snr=True)
    clip = build_clip(SIZE, len(tokenizer))
    stage = UnetStage(data, build_unet(SIZE), text_encoder_from_clip(clip), tokenizer, build_vae(SIZE),
                      prediction_type="v_prediction", zero_terminal_snr=True, sample_steps=2)
    assert stage.noise_scheduler.alphas_cumprod[-1] == 0   # the last step keeps nothing of the image
    assert stage.loss_weights(torch.tensor([999])).item() == 1.0
    sampler = inference_scheduler(stage.schedule)
    sampler.set_timesteps(4)
    assert sampler.timesteps[0] == 999   # sampling starts where training ended: pure noise
    result = run(stage, TrainConfig(tmp_path, max_steps=2, batch_size=8, sample_every=2, mixed_precision="no"))
    assert all(torch.isfinite(p).all() for p in result.modules["unet"].parameters())
    assert (tmp_path / "samples" / "step-00000002.png").is_file()
