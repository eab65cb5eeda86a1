"""The text-conditional GAN: loss terms by hand, generation, the saved folder, training through the loop."""

import json
import math
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPTextModel

from brushwork.data.captions import all_captions, contradicting_captions
from brushwork.data.dataset import open_dataset
from brushwork.errors import BrushworkError
from brushwork.train.options import runs_folder
from brushwork.generation.gan_pipeline import GanModel
from brushwork.generation.registry import resolve_model
from brushwork.models.gan import (
    WordAttention,
    build_discriminator,
    build_generator,
    gan_generate,
    is_gan_folder,
    load_generator,
    save_generator,
)
from brushwork.models.sizes import SIZES, build_clip
from brushwork.tokenizer import train_tokenizer
from brushwork.train.gan import (
    GanStage,
    GanTrainConfig,
    clip_contrastive_loss,
    clip_loss,
    discriminator_loss,
    generator_loss,
    mismatched_captions,
    mismatched_order,
    pairwise_distance,
    r1_penalty,
    train_gan,
)
from brushwork.train.loop import TrainConfig, run
from brushwork.train.stages import text_encoder_from_clip

PROMPTS = ["a red circle", "a blue square", "two green triangles"]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A folder with a tokenizer trained on the shapes captions and a tiny random CLIP text tower."""
    folder = tmp_path_factory.mktemp("text_model")
    tokenizer = train_tokenizer(all_captions(), folder / "tokenizer")
    torch.manual_seed(0)
    clip = build_clip(SIZES["tiny"], len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    text_encoder = text_encoder_from_clip(clip).eval()
    text_encoder.save_pretrained(folder / "text_encoder")
    return folder, tokenizer, text_encoder


@pytest.fixture(scope="module")
def data():
    return open_dataset("shapes", n=16, resolution=32)


def tiny_g(text_encoder, seed=0):
    torch.manual_seed(seed)
    g = build_generator("tiny", text_encoder.config.hidden_size)
    with torch.no_grad():  # the zero-initialised modulations and attention outputs would hide the text
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return g


def make_stage(text_model, data, **kwargs):
    _, tokenizer, text_encoder = text_model
    torch.manual_seed(0)
    g = build_generator("tiny", text_encoder.config.hidden_size)
    d = build_discriminator("tiny", text_encoder.config.hidden_size)
    return GanStage(data, g, d, text_encoder, tokenizer, **kwargs)


# ---- loss terms by hand -------------------------------------------------------------------------


def test_hinge_losses_vanish_when_d_is_confident_and_count_margins():
    ones, valid = torch.ones(4), torch.ones(4, dtype=torch.bool)
    assert discriminator_loss(1.5 * ones, -2 * ones, -1 * ones, valid, "hinge") == 0
    # real at 0 costs 1; fake at 0 costs 1 with weight 1/2; mismatched at 1 costs 2 with weight 1/2.
    loss = discriminator_loss(0 * ones, 0 * ones, 1 * ones, valid, "hinge")
    assert loss.item() == pytest.approx(1 + 0.5 * 1 + 0.5 * 2)
    assert generator_loss(torch.tensor([2.0, -1.0]), "hinge").item() == pytest.approx(-0.5)


def test_nonsaturating_losses_at_logit_zero_are_log_two():
    zeros, valid = torch.zeros(3), torch.ones(3, dtype=torch.bool)
    assert generator_loss(zeros, "nonsaturating").item() == pytest.approx(math.log(2))
    assert discriminator_loss(zeros, zeros, zeros, valid, "nonsaturating").item() == pytest.approx(2 * math.log(2))
    # G gains by raising D's logit on its images; D by raising real and lowering fake logits.
    assert generator_loss(torch.full((3,), 3.0), "nonsaturating") < math.log(2)
    assert discriminator_loss(zeros + 3, zeros - 3, zeros - 3, valid, "nonsaturating") < 0.1


def test_matching_aware_term_counts_mismatched_pairs_as_fake():
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    mismatched = torch.tensor([1.0, 1.0, -3.0, 5.0])  # D thinks pairs 0, 1 (and the invalid 3) are real
    valid = torch.tensor([True, True, True, False])   # pair 3 has the same caption: not a mismatch
    # Hinge on mismatched: relu(1 + m) = 2, 2, 0 over the valid pairs -> mean 4/3, weight 1/2.
    assert discriminator_loss(real, fake, mismatched, valid, "hinge").item() == pytest.approx(0.5 * 4 / 3)
    assert discriminator_loss(real, fake, torch.full((4,), -1.0), valid, "hinge").item() == 0


def test_mismatched_order_never_pairs_a_caption_with_itself():
    texts = ["a red circle", "a red circle", "a blue square", "a green triangle"]
    for seed in range(10):
        order, valid = mismatched_order(texts, torch.Generator().manual_seed(seed))
        assert sorted(order.tolist()) == [0, 1, 2, 3] and (order != torch.arange(4)).all()
        assert valid.tolist() == [texts[i] != texts[j] for i, j in enumerate(order.tolist())]
    assert not mismatched_order(["a red circle"], torch.Generator()).__getitem__(1).any()


def test_mismatched_captions_are_near_misses_at_the_share_asked_for():
    texts = ["a red circle", "a red circle", "a blue square", "three green triangles", "a photo of a cat"]
    for seed in range(5):
        # share 0: exactly the captions of mismatched_order, from the same draws (earlier runs repeat)
        order, valid = mismatched_order(texts, torch.Generator().manual_seed(seed))
        wrong, wrong_valid = mismatched_captions(texts, 0.0, torch.Generator().manual_seed(seed))
        assert wrong == [texts[j] for j in order.tolist()] and torch.equal(wrong_valid, valid)
        # share 1: every caption of the grammar gets one of its contradictions; the others keep a batch caption
        wrong, wrong_valid = mismatched_captions(texts, 1.0, torch.Generator().manual_seed(seed))
        assert all(wrong[i] in contradicting_captions(texts[i]) for i in range(4)) and wrong_valid[:4].all()
        assert wrong[4] in texts[:4]
        again = mismatched_captions(texts, 1.0, torch.Generator().manual_seed(seed))
        assert again[0] == wrong and torch.equal(again[1], wrong_valid)
    single = ["a blue square"] * 400
    wrong = mismatched_captions(single, 0.5, torch.Generator().manual_seed(0))[0]
    hard = [w for w in wrong if w != "a blue square"]  # the rest are the batch's own (equal, so left out as invalid)
    assert 160 < len(hard) < 240
    # what changes is drawn first: shape and colour alike, though colour has 5 near misses and shape 2
    shape_changes = sum(w in ("a blue circle", "a blue triangle") for w in hard)
    assert 0.4 < shape_changes / len(hard) < 0.6


def test_r1_penalty_by_hand():
    x = torch.randn(3, 2, 2, requires_grad=True)
    w = torch.arange(4.0).view(2, 2)                        # D(x) = <w, x> + 1: gradient w, |w|² = 14
    logits = (x * w).sum(dim=(1, 2)) + 1
    assert r1_penalty(logits, x, gamma=2.0).item() == pytest.approx(14.0)
    constant = (x * 0).sum(dim=(1, 2)) + 5                  # D ignores the image: no penalty
    assert r1_penalty(constant, x, gamma=2.0).item() == 0


def test_clip_loss_is_zero_when_aligned_and_two_when_opposite():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert clip_loss(3 * text, text).item() == pytest.approx(0.0, abs=1e-6)   # scale does not matter
    assert clip_loss(-text, text).item() == pytest.approx(2.0)
    assert clip_loss(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), text).item() == pytest.approx(1.0)


def test_clip_contrastive_loss_by_hand():
    text = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])   # the own caption, an orthogonal and an opposite one
    own_in_bank = torch.tensor([[True, False, False]])
    # aligned: -log(e^s / (e^s + e^0 + e^-s)); the bank's copy of the own caption is no negative
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    assert clip_contrastive_loss(3 * text, text, bank, own_in_bank, scale=2.0).item() == pytest.approx(expected)
    # an image nearer a wrong caption than its own costs more than one nearer its own
    wrong = clip_contrastive_loss(torch.tensor([[0.0, 1.0]]), text, bank, own_in_bank, scale=2.0)
    assert wrong.item() == pytest.approx(-math.log(1 / (1 + math.exp(2) + 1)))
    assert wrong.item() > expected
    # without the mask the own caption would count against itself: log 2 more when aligned and s is large
    unmasked = clip_contrastive_loss(text, text, bank, torch.zeros(1, 3, dtype=torch.bool), scale=50.0)
    assert unmasked.item() == pytest.approx(math.log(2), abs=1e-6)


def test_pairwise_distance():
    images = torch.zeros(3, 1, 2, 2)
    assert pairwise_distance(images).item() == 0
    images[0] += 1  # pairs (0,1), (0,2) differ by 1 on every pixel, (1,2) not at all
    assert pairwise_distance(images).item() == pytest.approx(2 / 3)


# ---- generation and the folder ------------------------------------------------------------------


def test_generate_is_deterministic_per_seed_and_independent_of_the_batch(text_model):
    _, tokenizer, text_encoder = text_model
    g = tiny_g(text_encoder)
    first = gan_generate(g, text_encoder, tokenizer, PROMPTS, [0, 1, 2])
    again = gan_generate(g, text_encoder, tokenizer, PROMPTS, [0, 1, 2])
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, again))
    assert first[0].size == (32, 32) and first[0].mode == "RGB"
    alone = gan_generate(g, text_encoder, tokenizer, PROMPTS[2:], [2])[0]
    diff = torch.tensor(list(alone.tobytes()), dtype=torch.int) - torch.tensor(list(first[2].tobytes()), dtype=torch.int)
    assert diff.abs().max() <= 1  # the same image whatever else is in the batch (up to float rounding)
    other_seed = gan_generate(g, text_encoder, tokenizer, PROMPTS[:1], [7])[0]
    other_prompt = gan_generate(g, text_encoder, tokenizer, PROMPTS[1:2], [0])[0]
    assert other_seed.tobytes() != first[0].tobytes()
    assert other_prompt.tobytes() != first[0].tobytes()


def test_save_load_round_trip_and_gan_model(text_model, tmp_path):
    folder, tokenizer, text_encoder = text_model
    g = tiny_g(text_encoder)
    out = tmp_path / "gan"
    save_generator(g, out)
    assert is_gan_folder(out) and not is_gan_folder(folder)
    loaded = load_generator(out)
    assert loaded.config == g.config
    before = gan_generate(g, text_encoder, tokenizer, PROMPTS, [3, 4, 5])
    after = gan_generate(loaded, text_encoder, tokenizer, PROMPTS, [3, 4, 5])
    assert all(a.tobytes() == b.tobytes() for a, b in zip(before, after))

    with pytest.raises(BrushworkError, match="tokenizer"):
        GanModel.from_pretrained(out)
    for part in ("tokenizer", "text_encoder"):
        (out / part).symlink_to(folder / part)
    model = GanModel.from_pretrained(out).to(torch.device("cpu"), torch.float32)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4, 5)]
    images = model.generate(PROMPTS, generators, 32, 32)
    expected = torch.stack([torch.tensor(list(im.tobytes())).view(32, 32, 3).permute(2, 0, 1) for im in before])
    assert images.shape == (3, 3, 32, 32) and ((images * 255).round() - expected).abs().max() <= 1
    with pytest.raises(BrushworkError, match="32×32"):
        model.generate(PROMPTS[:1], generators[:1], 64, 64)

    (out / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(BrushworkError, match="model.safetensors"):
        load_generator(out)


def test_word_attention_is_multihead_attention_on_its_weights():
    torch.manual_seed(0)
    layer = WordAttention(64, 96, heads=2).eval()
    nn.init.normal_(layer.attention.out_proj.weight)  # zero at init, which would hide any difference
    nn.init.normal_(layer.attention.in_proj_bias)
    h, words = torch.randn(3, 64, 16, 16), torch.randn(3, 7, 96)
    word_mask = torch.arange(7)[None, :] < torch.tensor([[2], [7], [5]])
    with torch.no_grad():
        queries = layer.norm(h).flatten(2).transpose(1, 2)
        expected, _ = layer.attention(queries, words, words, key_padding_mask=~word_mask, need_weights=False)
        expected = h + expected.transpose(1, 2).reshape(h.shape)
        torch.testing.assert_close(layer(h, words, word_mask), expected)


@pytest.mark.slow   # AOTInductor compiles C++ for minutes; the package's cache key and errors are tested fast in test_compile
def test_the_compiled_generator_matches_eager_with_one_package_for_every_prompt_length(text_model, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("BRUSHWORK_CACHE", str(tmp_path / "cache"))
    folder, _, text_encoder = text_model
    out = tmp_path / "gan"
    save_generator(tiny_g(text_encoder), out)
    for part in ("tokenizer", "text_encoder"):
        (out / part).symlink_to(folder / part)
    eager = GanModel.from_pretrained(out).to(torch.device("cpu"), torch.float32)
    compiled = GanModel.from_pretrained(out).to(torch.device("cpu"), torch.float32)
    compiled.compile()
    for prompts in (PROMPTS[:2], ["a big yellow circle above two small red squares"] * 2):
        a = eager.generate(prompts, [torch.Generator().manual_seed(s) for s in (1, 2)], 32, 32)
        b = compiled.generate(prompts, [torch.Generator().manual_seed(s) for s in (1, 2)], 32, 32)
        assert ((a - b).abs() * 255).max() <= 1
    assert len(list((tmp_path / "cache" / "compiled").glob("gan-generator-*.pt2"))) == 1


def test_a_gan_folder_can_take_its_text_encoder_from_another_model(text_model, tmp_path):
    folder, tokenizer, text_encoder = text_model
    out = tmp_path / "gan"
    save_generator(tiny_g(text_encoder), out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"text_encoder_from": str(folder)}))
    model = GanModel.from_pretrained(out)
    assert torch.equal(model.text_encoder.get_input_embeddings().weight, text_encoder.get_input_embeddings().weight)
    (out / "config.json").write_text(json.dumps(config | {"text_encoder_from": str(tmp_path)}))
    with pytest.raises(BrushworkError, match="takes its text encoder from"):
        GanModel.from_pretrained(out)


# ---- training through the loop ------------------------------------------------------------------


def _config(out, steps, **overrides):
    settings = dict(out_dir=out, max_steps=steps, batch_size=4, lr=1e-3, mixed_precision="no", ema_decay=0.9,
                    checkpoint_every=1, log_every=1)
    return TrainConfig(**(settings | overrides))


def test_resume_is_exact(text_model, data, tmp_path):
    # r1_every=1: the double backward pass of R1 is in every step of both runs.
    reference = run(make_stage(text_model, data, r1_every=1), _config(tmp_path / "reference", 3))
    run(make_stage(text_model, data, r1_every=1), _config(tmp_path / "resumed", 1))
    resumed = run(make_stage(text_model, data, r1_every=1), _config(tmp_path / "resumed", 3, resume=True))
    assert resumed.step == 3
    for name in ("g", "d", "ema-g"):
        expected = load_file(reference.checkpoint / f"{name}.safetensors")
        actual = load_file(resumed.checkpoint / f"{name}.safetensors")
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name
    record = json.loads(reference.log_path.read_text().splitlines()[-1])
    for key in ("loss/d", "loss/g", "d/accuracy", "d/diversity", "d/r1", "d/real_logit", "g/fake_logit"):
        assert math.isfinite(record[key]), key


def test_d_can_learn_faster_than_g(text_model, tmp_path):
    folder, _, _ = text_model
    settings = dict(data="shapes", text_model=folder, size="tiny", n=16, batch_size=4, mixed_precision="no",
                    collapse_threshold=0.0, sample_every=0, log_every=1)
    out = train_gan(GanTrainConfig(out=tmp_path / "gan", steps=1, lr=1e-4, lr_d=4e-4, **settings))
    record = json.loads((runs_folder(out) / "gan" / "log.jsonl").read_text().splitlines()[-1])
    assert record["lr/d"] == pytest.approx(4e-4) and record["lr/g"] == pytest.approx(1e-4)
    facts = json.loads((out / "training.json").read_text())
    assert (facts["lr"], facts["lr_d"]) == (1e-4, 4e-4)
    with pytest.raises(BrushworkError, match="--lr-d must be above 0"):
        train_gan(GanTrainConfig(out=tmp_path / "other", steps=1, lr_d=0.0, **settings))


def test_collapse_stops_training_with_a_clear_error(text_model, data, tmp_path):
    stage = make_stage(text_model, data, collapse_threshold=10.0, collapse_patience=2, collapse_after=0,
                       log_every=1, run_dir=tmp_path / "run")
    with pytest.raises(BrushworkError, match="collapsed.*2 log intervals"):
        run(stage, _config(tmp_path / "run", 3, checkpoint_every=0))


def test_train_gan_writes_a_self_contained_folder(text_model, tmp_path):
    folder, tokenizer, text_encoder = text_model
    out = tmp_path / "gan"
    config = GanTrainConfig(data="shapes", text_model=folder, out=out, size="tiny", steps=3, n=16, batch_size=4,
                            mixed_precision="bf16", log_every=1, sample_every=3, collapse_after=0,
                            collapse_threshold=0.0)
    assert train_gan(config) == out
    for part in ("config.json", "model.safetensors", "tokenizer", "text_encoder", "README.md", "training.json"):
        assert (out / part).exists(), part
    assert (runs_folder(out) / "gan" / "samples" / "step-00000003.png").is_file()
    assert "- Machine: " in (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "brushwork" and card.data.pipeline_tag == "text-to-image"
    assert card.data.license == "apache-2.0" and card.data.datasets == ["shapes"] and "gan" in card.data.tags
    # The folder holds the very encoder G was trained with (saved from memory, not copied from the text model).
    saved = CLIPTextModel.from_pretrained(out / "text_encoder")
    for name, tensor in text_encoder.state_dict().items():
        assert torch.equal(saved.state_dict()[name], tensor), name
    model = GanModel.from_pretrained(out)
    images = model.generate(PROMPTS, [torch.Generator().manual_seed(0)] * 3, 32, 32)
    assert images.shape == (3, 3, 32, 32) and torch.isfinite(images).all()

    with pytest.raises(BrushworkError, match="text_encoder"):
        train_gan(GanTrainConfig(data="shapes", text_model=tmp_path, out=tmp_path / "other", size="tiny"))
    with pytest.raises(BrushworkError, match="unknown GAN size"):
        train_gan(GanTrainConfig(data="shapes", text_model=folder, out=tmp_path / "other", size="huge"))


def test_init_starts_from_another_runs_weights_and_records_where(text_model, tmp_path):
    folder, _, _ = text_model
    settings = dict(data="shapes", text_model=folder, size="tiny", n=16, batch_size=4, mixed_precision="no",
                    collapse_threshold=0.0, checkpoint_every=2, sample_every=0)
    first = train_gan(GanTrainConfig(out=tmp_path / "first", steps=2, command="brushwork train gan first",
                                     **settings))
    source = runs_folder(first) / "gan" / "checkpoints" / "step-00000002"
    # lr 0: the weights stay where --init put them, so the saved G must be the source's EMA G exactly.
    second = train_gan(GanTrainConfig(out=tmp_path / "second", steps=1, lr=0.0, init=first,
                                      command="brushwork train gan second", **settings))
    expected = load_file(source / "ema-g.safetensors")
    saved = load_file(second / "model.safetensors")
    assert all(torch.equal(expected[k], saved[k]) for k in expected)
    d_start = load_file(runs_folder(second) / "gan" / "checkpoints" / "step-00000001" / "d.safetensors")
    d_source = load_file(source / "d.safetensors")
    assert all(torch.equal(d_source[k], d_start[k]) for k in d_source)
    facts = json.loads((second / "training.json").read_text())
    assert facts["initialized_from"]["checkpoint"] == str(source) and facts["initialized_from"]["steps"] == 2
    assert facts["commands"] == ["brushwork train gan first", "brushwork train gan second"]
    assert f"after 2 steps of {source}" in (second / "README.md").read_text()
    assert ModelCard.load(second / "README.md").data.base_model == "first"

    # a run stopped before it wrote its card, resumed with --init still given, keeps the source's commands
    shutil.rmtree(runs_folder(second) / "gan" / "checkpoints" / "step-00000002", ignore_errors=True)
    (second / "training.json").unlink()
    resumed = train_gan(GanTrainConfig(out=tmp_path / "second", steps=2, lr=0.0, init=first, resume=True,
                                       command="brushwork train gan second --resume", **settings))
    assert json.loads((resumed / "training.json").read_text())["commands"] == [
        "brushwork train gan first", "brushwork train gan second --resume"]

    with pytest.raises(BrushworkError, match="no GAN checkpoint"):
        train_gan(GanTrainConfig(out=tmp_path / "third", steps=1, init=tmp_path / "nowhere", **settings))
    small = dict(settings, size="small")
    with pytest.raises(BrushworkError, match="does not fit a GAN of this size"):
        train_gan(GanTrainConfig(out=tmp_path / "third", steps=1, init=source, **small))


def test_train_gan_takes_a_shipped_models_text_encoder_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # no folder named "shapes" here: the name means the shipped model
    config = GanTrainConfig(data="shapes", text_model=Path("shapes"), out=tmp_path / "gan", size="tiny", steps=1,
                            n=8, batch_size=4, sample_every=0, collapse_threshold=0.0)
    out = train_gan(config)
    shipped = CLIPTextModel.from_pretrained(resolve_model("shapes") / "text_encoder")
    saved = CLIPTextModel.from_pretrained(out / "text_encoder")
    assert saved.config.hidden_size == shipped.config.hidden_size
    torch.testing.assert_close(saved.get_input_embeddings().weight, shipped.get_input_embeddings().weight.float())


@pytest.mark.parametrize(("option", "metric"), [("clip_weight", "g/clip_similarity"),
                                              ("clip_contrast", "g/clip_contrast")])
def test_clip_terms_are_logged_recorded_and_need_a_clip(text_model, tmp_path, monkeypatch, option, metric):
    monkeypatch.chdir(tmp_path)
    config = GanTrainConfig(data="shapes", text_model=Path("shapes"), out=tmp_path / "gan", size="tiny", steps=2,
                            n=8, batch_size=4, sample_every=0, collapse_threshold=0.0, log_every=1, **{option: 4.0})
    out = train_gan(config)
    logged = [json.loads(line) for line in (runs_folder(out) / "gan" / "log.jsonl").read_text().splitlines()]
    low, high = (-1, 1) if option == "clip_weight" else (1e-6, math.inf)  # a cosine; a cross-entropy
    assert all(low <= entry[metric] <= high for entry in logged)
    facts = json.loads((out / "training.json").read_text())
    assert facts[option] == 4.0 and sum(facts[k] for k in ("clip_weight", "clip_contrast")) == 4.0
    flag = "--" + option.replace("_", "-")
    assert {"clip_weight": "CLIP term weight 4.0", "clip_contrast": "contrastive CLIP term weight 4.0"}[option] in (
        out / "README.md").read_text()
    with pytest.raises(BrushworkError, match=f"{flag} needs a full CLIP model"):
        train_gan(GanTrainConfig(data="shapes", text_model=text_model[0], out=tmp_path / "other", size="tiny",
                                 **{option: 1.0}))
    with pytest.raises(BrushworkError, match=f"{flag} must be at least 0"):
        train_gan(GanTrainConfig(data="shapes", text_model=Path("shapes"), out=tmp_path / "other", size="tiny",
                                 **{option: -1.0}))


def test_mismatch_share_reaches_d_resumes_exactly_and_is_recorded(text_model, data, tmp_path):
    stage = make_stage(text_model, data, mismatch_share=1.0)
    assert stage.fingerprint()["hard_negatives"] == 1.0  # the old name: runs begun before the rename resume
    assert "hard_negatives" not in make_stage(text_model, data).fingerprint()  # earlier runs still resume
    batch = stage.collate([data[i] for i in range(4)])
    loss, metrics = stage.loss("d", stage.modules(), batch, torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item()) and 0 <= metrics["mismatch_accuracy"] <= 1
    near_misses = {c for text in batch["text"] for c in contradicting_captions(text)}
    assert set(stage._text_cache) - set(batch["text"]) <= near_misses  # D saw near misses, encoded for it
    assert set(stage._text_cache) & near_misses
    reference = run(make_stage(text_model, data, mismatch_share=0.5), _config(tmp_path / "reference", 3))
    run(make_stage(text_model, data, mismatch_share=0.5), _config(tmp_path / "resumed", 1))
    resumed = run(make_stage(text_model, data, mismatch_share=0.5), _config(tmp_path / "resumed", 3, resume=True))
    for name in ("g", "d"):
        expected = load_file(reference.checkpoint / f"{name}.safetensors")
        actual = load_file(resumed.checkpoint / f"{name}.safetensors")
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name


def test_near_miss_ranking_term_ranks_own_caption_above_a_near_miss(text_model, data):
    stage = make_stage(text_model, data, near_miss_weight=1.0)
    assert stage.fingerprint()["near_miss_weight"] == 1.0
    assert "near_miss_weight" not in make_stage(text_model, data).fingerprint()
    batch = stage.collate([data[i] for i in range(4)])
    calls = []
    d_call = stage.discriminator.forward

    def recording(images, sentence):
        calls.append((sentence, d_call(images, sentence)))
        return calls[-1][1]

    stage.discriminator.forward = recording
    try:
        with_term, metrics = stage.loss("g", stage.modules(), batch, torch.Generator().manual_seed(0))
    finally:
        del stage.discriminator.forward
    # one D call on [G's images | G's images]: their own captions, then a near miss of each
    (sentences, logits), = calls
    own, near = sentences.split(4)
    cpu = torch.device("cpu")
    torch.testing.assert_close(own, stage.text_features(batch["text"], cpu)[0])
    for text, row in zip(batch["text"], near):
        options = stage.text_features(contradicting_captions(text), cpu)[0]
        assert any(torch.equal(row, option) for option in options), text
    margin = (logits[:4] - logits[4:]).float().detach()
    assert metrics["near_miss_margin"].item() == pytest.approx(margin.mean().item(), abs=1e-6)
    stage.near_miss_weight = 0.5
    half, _ = stage.loss("g", stage.modules(), batch, torch.Generator().manual_seed(0))
    stage.near_miss_weight = 0.0
    without, _ = stage.loss("g", stage.modules(), batch, torch.Generator().manual_seed(0))
    # the same G images (z is drawn first); the term is softplus(-(D(own) - D(near miss))), log 2 at no margin
    assert (with_term - without).item() == pytest.approx(F.softplus(-margin).mean().item(), abs=1e-5)
    assert (half - without).item() == pytest.approx(0.5 * F.softplus(-margin).mean().item(), abs=1e-5)


def test_train_gan_mismatch_share_is_recorded_and_needs_shapes_captions(text_model, tmp_path, photo_folder):
    folder = text_model[0]
    small = {"text_model": folder, "size": "tiny", "steps": 1, "n": 8, "batch_size": 4, "sample_every": 0,
             "collapse_threshold": 0.0}
    out = train_gan(GanTrainConfig(data="shapes", out=tmp_path / "gan", mismatch_share=0.5, **small))
    assert json.loads((out / "training.json").read_text())["mismatch_share"] == 0.5
    assert "near-miss share of D's mismatched captions 0.5" in (out / "README.md").read_text()
    out = train_gan(GanTrainConfig(data="shapes", out=tmp_path / "ranked", near_miss_weight=2.0, log_every=1, **small))
    assert json.loads((out / "training.json").read_text())["near_miss_weight"] == 2.0
    logged = json.loads((runs_folder(out) / "gan" / "log.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(logged["g/near_miss_margin"])
    with pytest.raises(BrushworkError, match="--near-miss-weight must be at least 0"):
        train_gan(GanTrainConfig(data="shapes", out=tmp_path / "other", near_miss_weight=-1.0, **small))
    with pytest.raises(BrushworkError, match="--mismatch-share is a share"):
        train_gan(GanTrainConfig(data="shapes", out=tmp_path / "other", mismatch_share=1.5, **small))
    for option in ("mismatch_share", "near_miss_weight"):
        with pytest.raises(BrushworkError, match="--" + option.replace("_", "-") + " changes one word.*not in it"):
            train_gan(GanTrainConfig(data=str(photo_folder), out=tmp_path / "third", **{option: 0.5},
                                     **(small | {"n": None, "batch_size": 2})))


def test_the_caption_bank_holds_each_distinct_caption_once(text_model, data):
    tokenizer = text_model[1]
    clip = build_clip(SIZES["tiny"], len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    stage = make_stage(text_model, data, clip=clip, clip_contrast=1.0)
    index, bank = stage.caption_bank(torch.device("cpu"))
    captions = [data[i]["text"] for i in range(len(data))]
    assert sorted(index) == sorted(set(captions)) and len(bank) == len(index)
    for caption in captions[:3]:
        torch.testing.assert_close(bank[index[caption]], stage.clip_text_embeds([caption], torch.device("cpu"))[0])


def test_a_run_with_a_deleted_term_does_not_resume_but_its_weights_start_a_new_one(text_model, tmp_path):
    settings = dict(data="shapes", text_model=text_model[0], size="tiny", n=8, batch_size=4, sample_every=0,
                    collapse_threshold=0.0, checkpoint_every=1)
    old = train_gan(GanTrainConfig(out=tmp_path / "old", steps=1, **settings))
    checkpoint = runs_folder(old) / "gan" / "checkpoints" / "step-00000001"
    state = json.loads((checkpoint / "state.json").read_text())   # as a run with --patch-weight 1 left it
    state["fingerprint"]["patch_weight"] = 1.0
    (checkpoint / "state.json").write_text(json.dumps(state))
    (checkpoint / "p.safetensors").write_bytes(b"")
    with pytest.raises(BrushworkError, match="--patch-weight, which brushwork no longer has.*--init"):
        train_gan(GanTrainConfig(out=old, steps=2, resume=True, **settings))
    new = train_gan(GanTrainConfig(out=tmp_path / "new", steps=1, init=checkpoint, **settings))
    assert (new / "model.safetensors").is_file()
