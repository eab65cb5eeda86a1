import json

import pytest
from transformers import CLIPTokenizer, CLIPTokenizerFast

from brushwork.data.captions import all_captions
from brushwork.errors import BrushworkError
from brushwork.tokenizer import BOS_TOKEN, EOS_TOKEN, train_tokenizer


@pytest.fixture(scope="module")
def shapes_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(all_captions(), folder)
    return folder


def test_saved_in_clip_format(shapes_tokenizer_dir):
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        assert (shapes_tokenizer_dir / name).is_file(), name
    vocab = json.loads((shapes_tokenizer_dir / "vocab.json").read_text())
    assert vocab[BOS_TOKEN] == len(vocab) - 2 and vocab[EOS_TOKEN] == len(vocab) - 1
    assert "a</w>" in vocab and "a" in vocab   # CLIP's end-of-word convention, both forms of every byte
    tokenizer = CLIPTokenizer.from_pretrained(shapes_tokenizer_dir)
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.eos_token == EOS_TOKEN
    assert tokenizer("").input_ids == [tokenizer.bos_token_id, tokenizer.eos_token_id]


def test_round_trips_every_shapes_caption_as_whole_words(shapes_tokenizer_dir):
    tokenizer = CLIPTokenizer.from_pretrained(shapes_tokenizer_dir)
    captions = all_captions()
    encoded = tokenizer(captions).input_ids
    for caption, ids in zip(captions, encoded):
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption
        assert len(ids) == len(caption.split()) + 2, (caption, tokenizer.convert_ids_to_tokens(ids))


def test_fast_tokenizer_agrees(shapes_tokenizer_dir):
    slow = CLIPTokenizer.from_pretrained(shapes_tokenizer_dir)
    fast = CLIPTokenizerFast.from_pretrained(shapes_tokenizer_dir)
    captions = all_captions()[:50]
    assert fast(captions).input_ids == slow(captions).input_ids


def test_unseen_text_is_lowercased_and_never_unknown(shapes_tokenizer_dir):
    tokenizer = CLIPTokenizer.from_pretrained(shapes_tokenizer_dir)
    ids = tokenizer("A Zebra with 42 Stripes").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a zebra with 4 2 stripes"   # CLIP splits digits


def test_vocab_size_is_an_upper_bound(tmp_path):
    tokenizer = train_tokenizer(all_captions(), tmp_path, vocab_size=530)
    assert len(tokenizer) == 530
    with pytest.raises(BrushworkError, match="too small"):
        train_tokenizer(all_captions(), tmp_path, vocab_size=100)


def test_empty_captions_are_refused(tmp_path):
    with pytest.raises(BrushworkError, match="no captions"):
        train_tokenizer(["", " "], tmp_path)
