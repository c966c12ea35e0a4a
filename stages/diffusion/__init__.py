"""The diffusion generator: the primary face repainted by an img2img diffusion model
(SD-Turbo, SDXL-Turbo, LCM) in real time, from the face's emotion.

``stage.DiffusionStage`` is the pipeline stage (kind ``diffusion``) and ``config`` its
config section; ``loading`` loads a diffusers-format model offline, ``prompts`` caches
prompt embeddings, ``realtime`` is the batched img2img loop (``cuda_graph`` its optional
CUDA-graph replay), ``gating`` decides which frames are worth a render. diffusers and
transformers are imported only when a model is loaded.
"""

from stages.diffusion.config import DiffusionConfig
from stages.diffusion.stage import DiffusionStage

__all__ = ["DiffusionConfig", "DiffusionStage"]
