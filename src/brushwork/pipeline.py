"""Compatibility: the public generation names under their old module; they live in brushwork.generation."""

from brushwork.generation.auto import BrushworkPipeline
from brushwork.generation.best_of import MAX_BEST_OF, candidate_seed
from brushwork.generation.output import GenerationCancelled, GenerationOutput
from brushwork.generation.registry import DEFAULT_MODEL, SHIPPED_MODELS_DIR, resolve_model, shipped_models
from brushwork.generation.samplers import A1111_SAMPLER_NAMES, SAMPLERS, resolve_sampler

__all__ = ["A1111_SAMPLER_NAMES", "DEFAULT_MODEL", "MAX_BEST_OF", "SAMPLERS", "SHIPPED_MODELS_DIR", "BrushworkPipeline",
           "GenerationCancelled", "GenerationOutput", "candidate_seed", "resolve_model", "resolve_sampler",
           "shipped_models"]
