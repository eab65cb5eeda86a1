"""A CLIP-style byte-level BPE tokenizer trained on the data set's own captions.

The tokenizer uses exactly the text pipeline of `transformers.CLIPTokenizer` (NFC, whitespace folding,
lowercase, CLIP's word split, byte-level alphabet, `</w>` end-of-word suffix), so the saved folder
loads with `CLIPTokenizer.from_pretrained(folder)` and works in diffusers pipelines.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE

from brushwork.errors import BrushworkError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_VOCAB_SIZE = 4096


def _byte_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _train_merges(captions: Iterable[str], max_merges: int) -> list[tuple[str, str]]:
    from transformers import CLIPTokenizer  # here, not at the top: the CLI's train options import this module

    # Borrow CLIPTokenizer's own normalizer and word split so training sees words exactly as loading will.
    clip_pipeline = CLIPTokenizer().backend_tokenizer
    backend = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    backend.normalizer = clip_pipeline.normalizer
    backend.pre_tokenizer = clip_pipeline.pre_tokenizer
    # Room for the full alphabet in both forms on top of the merges: the trainer counts both in vocab_size.
    trainer = trainers.BpeTrainer(
        vocab_size=max_merges + 2 * len(_byte_alphabet()),
        initial_alphabet=_byte_alphabet(),
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    backend.train_from_iterator(captions, trainer=trainer)
    merges = json.loads(backend.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    # Merges are learnt in order, so any prefix of the list is itself a complete BPE.
    return merges[:max_merges]


def train_tokenizer(
    captions: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_length: int = 77,
) -> CLIPTokenizer:
    """Train a byte-level BPE on `captions`, save it in CLIPTokenizer's format to `out_dir`, return it.

    The vocabulary is laid out like CLIP's: the 256 byte symbols, the same with `</w>`, one token per
    merge, then the start and end tokens. `vocab_size` is an upper bound: a small caption set (shapes)
    runs out of pairs to merge well before it, which gives a smaller vocabulary.
    """
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    base_size = 2 * len(alphabet) + 2
    if vocab_size < base_size:
        raise BrushworkError(f"tokenizer vocab_size {vocab_size} is too small: the byte alphabet alone needs "
                             f"{base_size}.")
    merges = _train_merges(captions, vocab_size - base_size)
    if not merges:
        raise BrushworkError("no captions to train the tokenizer on: the data set's captions are all empty.")

    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    # save_pretrained writes only tokenizer.json; vocab.json, merges.txt and special_tokens_map.json are
    # CLIP's classic files, which older transformers and other tools read.
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return tokenizer
