"""Metrics on feature vectors and embeddings: realism, diversity, text agreement, faithfulness intervals.

Every function takes tensors of features already extracted (see brushwork.eval.features), so one pass
of the feature extractor serves FID, KID, PRDC and intra-prompt diversity alike.
"""

import warnings

import torch
from scipy.stats import binomtest
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class _PassThrough(nn.Module):
    """Lets torchmetrics' FID/KID take features we extracted already (their `feature` may be any module)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (torchmetrics' FID maths)."""
    metric = FrechetInceptionDistance(feature=_PassThrough(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return max(float(metric.compute()), 0.0)


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance (mean, std over random subsets), torchmetrics' polynomial-kernel MMD."""
    subset_size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # its note that it keeps all features in memory: ours already are
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_PassThrough(real.shape[1]), subsets=subsets, subset_size=subset_size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    # KID draws its subsets from the global RNG; fork it so the number is reproducible and nothing leaks.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_neighbour_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    distances = torch.cdist(features, features)
    # Index k, not k-1: the nearest "neighbour" at index 0 is the point itself.
    return distances.kthvalue(k + 1, dim=1).values


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020).

    Hand-written: torchmetrics has no PRDC, and the `prdc` package computes the same four numbers with numpy
    and scikit-learn from arrays; here they are four lines on torch.cdist of the features already extracted.

    Each real point owns a ball whose radius is the distance to its k-th nearest real neighbour; each fake
    point likewise among the fakes. precision: share of fakes inside some real ball. recall: share of reals
    inside some fake ball. density: mean number of real balls holding a fake, divided by k. coverage: share
    of real balls holding at least one fake.
    """
    real, fake = real.double(), fake.double()
    real_radii = _kth_neighbour_radii(real, k)
    fake_radii = _kth_neighbour_radii(fake, k)
    real_fake = torch.cdist(real, fake)                        # [N_real, N_fake]
    inside_real_ball = real_fake <= real_radii[:, None]          # fake j inside real ball i
    inside_fake_ball = real_fake <= fake_radii[None, :]          # real i inside fake ball j
    return {
        "precision": inside_real_ball.any(dim=0).double().mean().item(),
        "recall": inside_fake_ball.any(dim=1).double().mean().item(),
        "density": (inside_real_ball.double().sum(dim=0) / k).mean().item(),
        "coverage": (real_fake.min(dim=1).values <= real_radii).double().mean().item(),
    }


def intra_prompt_diversity(groups: torch.Tensor) -> float:
    """Mean pairwise Euclidean feature distance among the images of one prompt, averaged over prompts.

    groups: [P, K, D], K >= 2 images per prompt.
    """
    distances = torch.cdist(groups.double(), groups.double())     # [P, K, K]
    k = groups.shape[1]
    return (distances.sum(dim=(1, 2)) / (k * (k - 1))).mean().item()


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """Mean of max(100 · cos(image_i, text_i), 0) over matching pairs (Hessel et al. 2021, as torchmetrics).

    Not torchmetrics' CLIPScore: it embeds images and text with a CLIP it loads by name, through its own
    processor; this scores the embeddings the model's own CLIP (ClipEmbedder) already made for several metrics."""
    cosine = nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return (100 * cosine).clamp(min=0).mean().item()


def retrieval_accuracy(image_embeds: torch.Tensor, prompt_embeds: torch.Tensor, targets: torch.Tensor,
                       ks: tuple[int, ...] = (1, 5)) -> dict[int, float | None]:
    """Share of images whose own prompt (index `targets`) ranks in the top k of all prompts by cosine.

    None for a k that is not below the number of prompts (every image would trivially pass).
    """
    image_embeds = nn.functional.normalize(image_embeds.double(), dim=-1)
    prompt_embeds = nn.functional.normalize(prompt_embeds.double(), dim=-1)
    similarity = image_embeds @ prompt_embeds.T                  # [N_images, N_prompts]
    own = similarity.gather(1, targets[:, None])
    rank = (similarity > own).sum(dim=1)                         # prompts strictly better than the own one
    return {k: ((rank < k).double().mean().item() if k < len(prompt_embeds) else None) for k in ks}


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion, from scipy (binomtest); (0, 1) for no trials."""
    if n == 0:
        return 0.0, 1.0
    interval = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)
