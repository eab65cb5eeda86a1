import pytest
import torch

from brushwork.eval import metrics


def _gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator, dtype=torch.float64) + shift


def test_fid_zero_for_identical_and_grows_with_shift():
    real = _gaussian(400, 8, seed=0)
    assert metrics.fid(real, real.clone()) == pytest.approx(0.0, abs=1e-6)
    values = [metrics.fid(real, _gaussian(400, 8, seed=1, shift=s)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values)
    # A pure mean shift of s in every one of d dimensions adds about d·s² to the distance.
    assert values[-1] == pytest.approx(8 * 2.0**2, rel=0.15)


def test_kid_near_zero_for_identical_and_grows_with_shift():
    real = _gaussian(500, 8, seed=0)
    identical, _ = metrics.kid(real, real.clone(), subsets=20, subset_size=100)
    # The unbiased MMD estimate is exactly zero only in expectation; here it is a few hundredths.
    assert abs(identical) < 0.1
    half, _ = metrics.kid(real, _gaussian(500, 8, seed=1, shift=0.5), subsets=20, subset_size=100)
    whole, _ = metrics.kid(real, _gaussian(500, 8, seed=1, shift=1.0), subsets=20, subset_size=100)
    assert 0.5 < half < whole


def test_kid_reproducible_and_handles_small_sets():
    real, fake = _gaussian(30, 4, seed=0), _gaussian(20, 4, seed=1, shift=0.3)
    assert metrics.kid(real, fake, seed=3) == metrics.kid(real, fake, seed=3)   # subset_size shrinks to 20


def test_prdc_identical_sets():
    real = _gaussian(100, 6, seed=0)
    result = metrics.prdc(real, real.clone(), k=5)
    assert result["precision"] == 1.0 and result["recall"] == 1.0 and result["coverage"] == 1.0
    # Each real ball holds its centre and its k neighbours, so identical sets give exactly (k+1)/k.
    assert result["density"] == pytest.approx(6 / 5)


def test_prdc_same_distribution_density_near_one():
    result = metrics.prdc(_gaussian(1000, 4, seed=0), _gaussian(1000, 4, seed=1), k=5)
    assert result["density"] == pytest.approx(1.0, abs=0.1)
    assert result["precision"] > 0.8 and result["recall"] > 0.8 and result["coverage"] > 0.8


def test_prdc_disjoint_far_sets():
    result = metrics.prdc(_gaussian(100, 6, seed=0), _gaussian(100, 6, seed=1, shift=100.0), k=5)
    assert result == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_mode_collapse_keeps_precision_loses_recall():
    real = _gaussian(200, 2, seed=0)
    collapsed = real[:5].repeat(40, 1) + 1e-3 * _gaussian(200, 2, seed=1)
    result = metrics.prdc(real, collapsed, k=5)
    assert result["precision"] == 1.0
    assert result["recall"] < 0.2 and result["coverage"] < 0.2


def test_intra_prompt_diversity():
    one = _gaussian(3, 5, seed=0)
    identical = one[:, None, :].repeat(1, 4, 1)                 # 3 prompts, 4 identical images each
    assert metrics.intra_prompt_diversity(identical) == 0.0
    pair = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])             # one prompt, two images 5 apart
    assert metrics.intra_prompt_diversity(pair) == pytest.approx(5.0)


def test_retrieval_perfect_when_images_are_the_prompts():
    prompts = _gaussian(10, 16, seed=0)
    targets = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    result = metrics.retrieval_accuracy(prompts[targets] * 2.0, prompts, targets)
    assert result == {1: 1.0, 5: 1.0}


def test_retrieval_wrong_prompt_and_too_few_prompts():
    prompts = torch.eye(6)
    targets = torch.tensor([0, 1])
    images = prompts[torch.tensor([1, 0])]                       # each image is the other prompt
    result = metrics.retrieval_accuracy(images, prompts, targets, ks=(1, 5, 6))
    assert result[1] == 0.0 and result[5] == 1.0 and result[6] is None


def test_clip_score():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert metrics.clip_score(text * 3.0, text) == pytest.approx(100.0)
    assert metrics.clip_score(-text, text) == 0.0                 # negative cosine clamps to zero


@pytest.mark.parametrize("successes,n", [(0, 10), (5, 10), (10, 10), (37, 120)])
def test_wilson_interval(successes, n):
    low, high = metrics.wilson_interval(successes, n)
    assert 0.0 <= low <= successes / n <= high <= 1.0
    assert high - low < 0.65


def test_wilson_interval_known_value_and_narrows():
    low, high = metrics.wilson_interval(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert metrics.wilson_interval(0, 10)[0] == 0.0 and metrics.wilson_interval(10, 10)[1] == 1.0
    wide, narrow = metrics.wilson_interval(50, 100), metrics.wilson_interval(500, 1000)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)


def test_resize_images_follows_the_stated_convention():
    from PIL import Image

    from brushwork.eval.features import resize_images

    images = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("L", (48, 40), 128)]
    pixels = resize_images(images, 64)
    assert pixels.shape == (2, 3, 64, 64) and pixels.dtype == torch.uint8
    assert (pixels[0, 0] == 255).all() and (pixels[0, 1:] == 0).all()   # flat colours stay flat
    assert (pixels[1] == 128).all()                                      # greyscale becomes RGB
