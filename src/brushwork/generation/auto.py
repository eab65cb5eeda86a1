"""The pipeline class a model needs, picked from its folder, as diffusers' AutoPipelineForText2Image picks one."""

from pathlib import Path

import torch

from brushwork.generation.base import Text2ImagePipeline
from brushwork.generation.gan_pipeline import GanPipeline
from brushwork.generation.pipeline import LatentDiffusionPipeline
from brushwork.generation.registry import resolve_model
from brushwork.models.gan import is_gan_folder


def pipeline_class(path: Path) -> type[Text2ImagePipeline]:
    """GanPipeline for a brushwork GAN folder; LatentDiffusionPipeline for everything else (SD folders and single
    files; it says what is wrong with anything it cannot load)."""
    return GanPipeline if is_gan_folder(path) else LatentDiffusionPipeline


class BrushworkPipeline:
    """`BrushworkPipeline.from_pretrained(model)` loads any brushwork model into the pipeline class it needs."""

    def __init__(self, *args, **kwargs):
        raise TypeError("BrushworkPipeline picks a pipeline class: use BrushworkPipeline.from_pretrained(model)")

    @staticmethod
    def from_pretrained(path: str | Path | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, allow_pickle: bool = False, threads: int | None = None,
                        compile: bool = False) -> Text2ImagePipeline:
        """path: a model folder, an SD single file or a shipped model's name; None means the default shipped
        model. The other arguments are Text2ImagePipeline.from_pretrained's."""
        path = resolve_model(path)
        return pipeline_class(path).from_pretrained(path, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                                    threads=threads, compile=compile)
