"""Can a generator conditioned on this text encoder learn where things go? A probe for "above" and "below".

It trains a fresh GAN discriminator (brushwork.models.gan, conditioned on the pooled text features, as in
`train gan`) to accept shapes images with their own position caption and to reject the same images with a
relation near miss of it (`contradictions_by_kind`). Held-out accuracy is printed as it trains for three kinds:
the opposite relation ("a red circle below a blue square" for one above it), a perpendicular one ("a red circle
left of a blue square") and the two objects swapped ("a blue square above a red circle"). With a text encoder
that keeps the relation word, the discriminator learns it; with one that drops it, it stays at chance (0.5)
however long it trains, and so does every generator conditioned on that encoder.

    python scripts/relation_probe.py --model shapes                 # the shipped text encoder
    python scripts/relation_probe.py --model my-model --steps 1500  # one from `train clip --hard-negatives 1`
"""

import argparse
import random
import time

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTokenizer

from brushwork.data.captions import contradictions_by_kind
from brushwork.eval.relation_probe import RELATION_KINDS, position_items, relation_near_misses
from brushwork.generation.registry import resolve_model
from brushwork.models.gan import build_discriminator, encode_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes", help="model folder or shipped name with text_encoder/ and tokenizer/")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--every", type=int, default=250, help="steps between held-out checks")
    parser.add_argument("--images", type=int, default=3_000, help="position scenes drawn for training (a tenth "
                        "as many for the held-out check)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    folder = resolve_model(args.model)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").float().eval()
    train, held_out = position_items(args.seed, args.images), position_items(args.seed + 777, args.images // 10)

    features: dict[str, torch.Tensor] = {}   # pooled text features per caption: the encoder is frozen

    def sentences(texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in features]
        if missing:
            features.update(zip(missing, encode_text(text_encoder, tokenizer, missing, torch.device("cpu"))[0]))
        return torch.stack([features[t] for t in texts])

    discriminator = build_discriminator("small", text_encoder.config.hidden_size)
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.0, 0.99))
    images = torch.stack([item["pixel_values"] for item in held_out])
    own = [item["text"] for item in held_out]
    near_misses = {kind: [relation_near_misses(text)[kind] for text in own] for kind in RELATION_KINDS}

    @torch.no_grad()
    def held_out_accuracy() -> dict[str, float]:
        discriminator.eval()
        own_scores = discriminator(images, sentences(own))
        result = {kind: (own_scores > discriminator(images, sentences(texts))).float().mean().item()
                  for kind, texts in near_misses.items()}
        discriminator.train()
        return result

    started = time.time()
    print(f"{len(train)} training and {len(held_out)} held-out position images; text encoder of {folder}")
    for step in range(1, args.steps + 1):
        items = rng.sample(train, args.batch_size)
        batch = torch.stack([item["pixel_values"] for item in items])
        texts = [item["text"] for item in items]
        wrong = [rng.choice(contradictions_by_kind(text)["relation"]) for text in texts]
        loss = (F.softplus(-discriminator(batch, sentences(texts))).mean()
                + F.softplus(discriminator(batch, sentences(wrong))).mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            accuracy = ", ".join(f"{kind} {value:.2f}" for kind, value in held_out_accuracy().items())
            print(f"step {step}: loss {loss.item():.3f} (chance {2 * torch.log(torch.tensor(2.0)).item():.3f}); "
                  f"held-out accuracy: {accuracy}; {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
