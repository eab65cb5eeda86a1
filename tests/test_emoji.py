"""The emoji data set: CLDR captions, rendering from the OpenMoji colour font, skips counted."""

import time

import numpy as np
import pytest

from brushwork.data.emoji import ATTRIBUTION, attribution_text, build_emoji, cldr_caption, openmoji_codepoints


def test_cldr_captions_are_plain_words():
    assert cldr_caption("\U0001F600") == "grinning face"
    assert cldr_caption("\U0001F34E") == "red apple"
    assert cldr_caption("\U0001F1EF\U0001F1F5") == "flag Japan"
    assert cldr_caption("\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F") == "flag Scotland"
    assert cldr_caption("\U0001F44D\U0001F3FD") == "thumbs up medium skin tone"
    assert cldr_caption("#\ufe0f\u20e3") == "keycap #"
    assert cldr_caption("\u2764\ufe0f") == cldr_caption("\u2764") == "red heart"
    assert cldr_caption("\U0001F1E8\U0001F1EE") == "flag Côte d'Ivoire"   # curly apostrophe made ASCII
    assert cldr_caption("\ue2cc") is None                                    # an OpenMoji extra: no CLDR name


def test_small_build_renders_named_coloured_emoji():
    build = build_emoji(size=32, limit=40)
    assert len(build.items) == 40
    assert len({item.text for item in build.items}) == 40
    for item in build.items:
        pixels = np.asarray(item.image)
        assert item.image.size == (32, 32) and item.image.mode == "RGB"
        assert tuple(pixels[0, 0]) == (255, 255, 255)                       # white background
        assert (pixels.min(axis=2) < 200).mean() > 0.05                     # something is drawn
        assert item.text == cldr_caption(item.emoji)
    coloured = [item for item in build.items if np.ptp(np.asarray(item.image).astype(int), axis=2).max() > 100]
    assert len(coloured) > 20                                                # colour layers, not outlines only
    assert all(reason == "no CLDR name" for _, reason in build.skipped)


def test_attribution_names_openmoji_and_license():
    text = attribution_text(64)
    assert ATTRIBUTION in text and "CC BY-SA 4.0" in text and "64x64" in text


@pytest.mark.slow
def test_full_build_has_3500_named_emoji_in_under_two_minutes():
    start = time.perf_counter()
    build = build_emoji(size=64)
    seconds = time.perf_counter() - start
    assert len(build.items) >= 3500 and seconds < 120
    assert len(build.items) + len(build.skipped) == len(openmoji_codepoints())
    texts = {item.text for item in build.items}
    assert {"grinning face", "red apple", "flag Japan"} <= texts
