"""best_of as a wrapper around the sampling call: each image the best of K candidates by a CLIP's similarity
to its prompt (reranking, as DALL-E did). The CLIP is injected (the pipeline's `ranker`)."""

import random
from typing import Callable

import torch

from brushwork.generation.output import to_pil

MAX_BEST_OF = 16


def candidate_seed(seed: int, candidate: int) -> int:
    """The seed of best_of's candidate `candidate` (0, 1, ...) of the image whose seed is `seed`."""
    return seed if candidate == 0 else random.Random(f"{seed}-{candidate}").randrange(2**32)


def clip_similarity(ranker, prompts: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """images [B, 3, H, W] in [0, 1] -> the cosine similarity of each image's CLIP embedding to its prompt's."""
    text = torch.nn.functional.normalize(ranker.text_embeds(prompts), dim=-1)

    def similarity(images: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.normalize(ranker.image_embeds(to_pil(images)), dim=-1) * text).sum(-1)

    return similarity


def sample_best_of(sample: Callable, best_of: int, similarity: Callable[[], Callable] | None,
                   seeds: list[int | None], generator, callback: Callable | None,
                   steps_per_candidate: int) -> tuple[torch.Tensor, list[int | None]]:
    """sample(generators, callback) -> images, run best_of times; per image the candidate `similarity()` scores
    highest, and its seed. Later candidates take seeds drawn from (image seed, candidate), so no two images
    share a candidate (as seed + k would), or continue a caller's generators. The callback numbers the steps of
    later candidates on from the earlier ones', so a progress count covers them all."""
    best = sample(generator, callback)
    if best_of == 1:
        return best, seeds
    score_of = similarity()
    best_score, best_seeds = score_of(best), list(seeds)
    for candidate in range(1, best_of):
        if seeds[0] is None:
            candidate_seeds, generators = seeds, generator
        else:
            candidate_seeds = [candidate_seed(seed, candidate) for seed in seeds]
            generators = [torch.Generator("cpu").manual_seed(s) for s in candidate_seeds]
        images = sample(generators, callback and _numbered_on(callback, candidate * steps_per_candidate))
        score = score_of(images)
        better = score > best_score
        best[better], best_score[better] = images[better], score[better]
        best_seeds = [new if won else old for new, old, won in zip(candidate_seeds, best_seeds, better.tolist())]
    return best, best_seeds


def _numbered_on(callback: Callable, offset: int) -> Callable:
    def on_step(pipe, step, *rest):
        return callback(pipe, offset + step, *rest)
    return on_step
