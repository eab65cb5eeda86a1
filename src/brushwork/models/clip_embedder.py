"""A CLIP model folder as an embedder of images and texts: what evaluation scores with, and what best_of ranks
candidates by. Every image is resized the same way before embedding: clean-fid's convention, a PIL bicubic
resize of the RGB image to the model's input size."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPTokenizer

from brushwork.errors import BrushworkError
from brushwork.models.clip import load_clip

RESIZE_CONVENTION = "PIL bicubic resize of each RGB image to the extractor's input size (clean-fid convention)"


def resize_images(images: list[Image.Image], size: int) -> torch.Tensor:
    """uint8 tensor [N, 3, size, size] after a PIL bicubic resize (no crop: evaluation images are square)."""
    arrays = [np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "vocab.json").exists() or (folder / "tokenizer.json").exists()


class ClipEmbedder:
    """A transformers CLIPModel folder: projected image embeddings (also the realism features) and text embeddings.

    Images go in as the CLIP was trained: a folder with preprocessor_config.json (a CLIP from elsewhere)
    is normalised with its image_mean/image_std; a brushwork CLIP (no such file) sees pixels in [-1, 1],
    the data contract of brushwork's training.
    """

    def __init__(self, clip_dir: Path, tokenizer_dir: Path | None = None, device: str = "cpu", label: str | None = None):
        clip_dir = Path(clip_dir)
        if not (clip_dir / "config.json").exists():
            raise BrushworkError(f"{clip_dir} is not a CLIP model folder (no config.json); pass --clip PATH to a "
                                 "transformers CLIPModel folder.")
        if _has_tokenizer(clip_dir):
            tokenizer_dir = clip_dir
        if tokenizer_dir is None or not _has_tokenizer(Path(tokenizer_dir)):
            raise BrushworkError(f"no tokenizer for the CLIP at {clip_dir}: expected vocab.json there or in "
                                 f"{tokenizer_dir or 'MODEL/tokenizer'}.")
        try:
            self.model = load_clip(clip_dir).to(device).eval()
        except (OSError, ValueError) as error:
            raise BrushworkError(f"cannot load the CLIP model at {clip_dir}: {error}") from None
        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        self.device = device
        self.input_size = self.model.config.vision_config.image_size
        self.dim = self.model.config.projection_dim
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        processor_config = clip_dir / "preprocessor_config.json"
        if processor_config.exists():
            config = json.loads(processor_config.read_text())
            self.mean = torch.tensor(config["image_mean"]).view(1, 3, 1, 1)
            self.std = torch.tensor(config["image_std"]).view(1, 3, 1, 1)
        else:
            self.mean = torch.full((1, 3, 1, 1), 0.5)
            self.std = torch.full((1, 3, 1, 1), 0.5)
        self.name = (f"{label or 'CLIP'} at {clip_dir}: {self.dim}-d projected embeddings, "
                     f"{self.input_size}x{self.input_size} image input")

    @torch.no_grad()
    def image_embeds(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            pixels = resize_images(images[start:start + batch_size], self.input_size).float() / 255
            pixels = ((pixels - self.mean) / self.std).to(self.device)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeds(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(out)
