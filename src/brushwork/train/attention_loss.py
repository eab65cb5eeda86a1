"""Cross-attention supervision (TokenCompose, Wang et al. 2023): each object phrase's tokens should attend
inside that object's region.

A data item may carry `regions`: [{"phrase": "red circle", "box": [x0, y0, x1, y1]}] with the box as fractions
of the image (shapes scenes give them for free; a user's metadata.jsonl may too). For each cross-attention
layer of the UNet the loss is (1 - share of the phrase tokens' attention that falls inside the box)², averaged
over objects and layers. Objects with the same phrase ("three red circles") share one token set, so their
boxes are joined. At high noise the image does not yet show where an object is, so the only way to attend to
the right place is to read it from the caption: the relation word gets a direct, dense training signal.

Hand-written because diffusers' attention processors compute the attention probabilities without keeping
them; this one is its plain attention path with the probabilities recorded.
"""

import math

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention


class AttentionRecorder:
    """Cross-attention processor (shared by every `attn2`) that keeps each call's attention probabilities
    while `recording` is set."""

    def __init__(self):
        self.recording = False
        self.maps: list[tuple[torch.Tensor, int]] = []   # (probabilities [batch·heads, queries, tokens], heads)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probabilities = attn.get_attention_scores(query, key, attention_mask)
        if self.recording:
            self.maps.append((probabilities, attn.heads))
        out = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def install_recorder(unet: UNet2DConditionModel) -> AttentionRecorder:
    """Put one recorder on every cross-attention layer (the self-attention layers keep their processors)."""
    recorder = AttentionRecorder()
    processors = {name: recorder if name.endswith("attn2.processor") else processor
                  for name, processor in unet.attn_processors.items()}
    unet.set_attn_processor(processors)
    return recorder


def word_token_positions(tokenizer, caption: str) -> list[list[int]]:
    """Token positions (after the start token) of each whitespace-separated word of `caption`. CLIP's BPE
    splits on whitespace before merging, so a caption's tokens are its words' tokens in order."""
    positions, start = [], 1
    for word in caption.split():
        count = len(tokenizer.tokenize(word))
        positions.append(list(range(start, start + count)))
        start += count
    return positions


def phrase_positions(words: list[str], phrase: str) -> list[int]:
    """Indices of the words that spell `phrase` ("red circle" matches "red circles" too), first occurrence;
    [] when the caption does not contain it."""
    wanted = phrase.lower().split()
    lowered = [word.lower() for word in words]
    for start in range(len(words) - len(wanted) + 1):
        if all(lowered[start + j].startswith(w) for j, w in enumerate(wanted)):
            return list(range(start, start + len(wanted)))
    return []


def box_mask(box: list[float], side: int) -> torch.Tensor:
    """[side·side] mask of the grid cells whose centres lie in the box; the cell under the box's centre if
    the box is smaller than a cell."""
    x0, y0, x1, y1 = box
    centres = (torch.arange(side) + 0.5) / side
    inside_x = (centres >= x0) & (centres <= x1)
    inside_y = (centres >= y0) & (centres <= y1)
    mask = (inside_y[:, None] & inside_x[None, :]).float()
    if mask.sum() == 0:
        column = min(int((x0 + x1) / 2 * side), side - 1)
        row = min(int((y0 + y1) / 2 * side), side - 1)
        mask[max(row, 0), max(column, 0)] = 1.0
    return mask.flatten()


class RegionTargets:
    """Per batch: which tokens each object phrase has and where its region is, at every attention grid side."""

    def __init__(self, tokenizer, texts: list[str], regions: list[list[dict] | None], max_tokens: int):
        groups = []   # per item: {token positions: [boxes]}
        for text, item_regions in zip(texts, regions):
            by_tokens: dict[tuple[int, ...], list[list[float]]] = {}
            if text and item_regions:
                words = text.split()
                token_positions = word_token_positions(tokenizer, text)
                for region in item_regions:
                    indices = phrase_positions(words, region["phrase"])
                    tokens = tuple(t for i in indices for t in token_positions[i] if t < max_tokens)
                    if tokens:
                        by_tokens.setdefault(tokens, []).append(region["box"])
            groups.append(by_tokens)
        count = max([len(g) for g in groups] + [1])
        self.tokens = torch.zeros(len(texts), count, max_tokens)
        self.valid = torch.zeros(len(texts), count)
        self.groups = groups
        self._masks: dict[int, torch.Tensor] = {}
        for b, by_tokens in enumerate(groups):
            for r, tokens in enumerate(by_tokens):
                self.tokens[b, r, list(tokens)] = 1.0
                self.valid[b, r] = 1.0

    def masks(self, side: int) -> torch.Tensor:
        """[B, R, side·side]: each object group's boxes joined, on a side×side grid."""
        if side not in self._masks:
            masks = torch.zeros(*self.valid.shape, side * side)
            for b, by_tokens in enumerate(self.groups):
                for r, boxes in enumerate(by_tokens.values()):
                    masks[b, r] = torch.stack([box_mask(box, side) for box in boxes]).amax(0)
            self._masks[side] = masks
        return self._masks[side]

    def any(self) -> bool:
        return bool(self.valid.any())

    def loss(self, maps: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        batch = self.tokens.shape[0]
        losses = []
        for probabilities, heads in maps:
            queries = probabilities.shape[1]
            side = math.isqrt(queries)
            attention = probabilities.float().reshape(batch, heads, queries, -1).mean(1)    # [B, N, T]
            tokens = self.tokens.to(attention.device)
            per_object = torch.einsum("bnt,brt->brn", attention, tokens)                    # [B, R, N]
            inside = (per_object * self.masks(side).to(attention.device)).sum(-1) / per_object.sum(-1).clamp_min(1e-6)
            valid = self.valid.to(attention.device)
            losses.append(((1 - inside) ** 2 * valid).sum() / valid.sum().clamp_min(1.0))
        return torch.stack(losses).mean()

