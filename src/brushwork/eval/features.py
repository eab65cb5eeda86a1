"""Feature extractors for evaluation: a CLIP model (image and text embeddings) and, when the user has the
weights file, the standard FID Inception-v3.

Numbers from different extractors do not compare, so each extractor carries a `name` the report prints.
Every image is resized the same way before extraction: clean-fid's convention, a PIL bicubic resize of the
RGB image to the extractor's input size.
"""

from pathlib import Path

import torch
from PIL import Image

from brushwork.errors import BrushworkError
from brushwork.models.clip_embedder import RESIZE_CONVENTION, ClipEmbedder, resize_images

__all__ = ["RESIZE_CONVENTION", "ClipEmbedder", "InceptionFeatures", "resize_images"]


class InceptionFeatures:
    """The standard FID Inception-v3 (pool3, 2048-d) from a weights file the user has; never downloaded.

    The file is torch-fidelity's pt_inception-2015-12-05 state dict; the network code is torch-fidelity's,
    through torchmetrics.
    """

    input_size = 299
    dim = 2048

    def __init__(self, weights_path: Path, device: str = "cpu"):
        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise BrushworkError(f"--inception-weights {weights_path}: no such file. Give the FID Inception "
                                 "weights (pt_inception-2015-12-05-6726825d.pth) or leave the option out to "
                                 "use the model's CLIP.")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            self.model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                            feature_extractor_weights_path=str(weights_path)).to(device)
        except ModuleNotFoundError:
            raise BrushworkError("--inception-weights needs torch-fidelity (and a torchvision built for your torch): "
                                 "pip install torch-fidelity") from None
        except (RuntimeError, KeyError) as error:
            raise BrushworkError(f"cannot load Inception weights from {weights_path}: {error}") from None
        self.device = device
        self.name = f"Inception-v3 pool3 ({weights_path.name}), 2048-d, 299x299 input"

    @torch.no_grad()
    def image_embeds(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            pixels = resize_images(images[start:start + batch_size], self.input_size).to(self.device)
            out.append(self.model(pixels).float().cpu())
        return torch.cat(out)
