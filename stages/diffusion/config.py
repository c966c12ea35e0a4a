"""The diffusion stage's config section: which model, how it runs, and how often it may.

Three groups of fields:

* the model — a diffusers-format directory (SD-Turbo, SDXL-Turbo or an LCM model), an
  optional tiny autoencoder (TAESD) in place of its VAE, the dtype and the side it runs at;
* the img2img schedule — ``steps`` and ``strength`` pick the timesteps exactly as
  diffusers' img2img pipelines do (``steps * strength`` UNet calls, at least one), and
  ``guidance_scale`` above 1 turns classifier-free guidance on (turbo models run
  without it);
* the regeneration budget — the similarity filter and the per-session token bucket
  decide when a frame is rendered and when the previous portrait is shown again;

plus the framing options every portrait stage has (``PortraitConfig``: the same face,
the same window as the generator).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import check, check_choice, check_range
from stages.generator.framing import PortraitConfig

DTYPES = ("auto", "float16", "bfloat16", "float32")
"""'auto' is float16 on CUDA and float32 on a CPU (half precision is slow there)."""


@dataclass(kw_only=True, slots=True)
class DiffusionConfig(PortraitConfig):
    model_path: str | None = None
    """A diffusers-format model directory (``model_index.json`` plus unet/, vae/,
    text_encoder/, tokenizer/, scheduler/; SDXL models also text_encoder_2/, tokenizer_2/),
    e.g. a downloaded stabilityai/sd-turbo. Read offline only. Null: the stage loads
    nothing, says it is unavailable and rejects every frame, so the pipeline's fallback
    serves."""
    variant: str | None = None
    """Weight-file variant to load, e.g. 'fp16' for ``diffusion_pytorch_model.fp16.safetensors``;
    null loads the plain files."""
    tiny_autoencoder_path: str | None = None
    """An AutoencoderTiny (TAESD / TAESDXL) directory used instead of the model's VAE: a
    fraction of the VAE's encode and decode cost, slightly softer pictures."""
    dtype: str = "auto"
    """Weights and activations: 'auto' (float16 on CUDA, float32 on CPU), 'float16',
    'bfloat16' or 'float32'."""
    size: int = 512
    """Side of the square the model runs at, a multiple of 8 (512 for SD-Turbo, 512 or
    1024 for SDXL-Turbo); the portrait is resized to the live ``output_size``."""
    steps: int = 2
    """Length of the timestep schedule (1..8). img2img runs its last ``steps * strength``
    steps: with trailing spacing, steps 2 and strength 0.5 is one UNet call at t=499."""
    strength: float = 0.5
    """How much of the schedule img2img runs (0..1): how far the picture may depart from
    the face. 1 ignores the input image."""
    guidance_scale: float = 0.0
    """Classifier-free guidance scale; at most 1 means none (turbo models: 0). For LCM
    models with a guidance embedding it is the embedded scale instead."""
    seed: int = 0
    """Seed of the fixed noise every frame is noised with: the same picture renders the
    same way, so the portrait does not boil from frame to frame."""
    similarity_threshold: float = 0.98
    """Cosine similarity of a crop to the last rendered crop of its session above which
    the frame may be skipped (the previous portrait shown again), with a probability that
    rises to 1 for an identical crop. 0 turns the filter off."""
    similarity_max_skips: int = 10
    """Consecutive similarity skips after which a frame is rendered anyway."""
    regen_rate: float = 15.0
    """Renders per second one session may use (a token bucket); 0 means no cap. Frames
    over the cap show the previous portrait again."""
    regen_burst: int = 3
    """Renders a session may use back to back before ``regen_rate`` applies (the bucket's size)."""
    prompt_cache_size: int = 128
    """Prompt embeddings kept (least recently used dropped beyond); every curated prompt
    fits in the default."""
    compile: bool = False
    """``torch.compile`` the UNet (minutes of compiling at startup, faster steps after)."""
    cuda_graphs: bool = False
    """Replay the UNet as a captured CUDA graph, one per batch size (CUDA only; ignored on
    a CPU). Cuts the launch overhead that dominates one-step models at small batches."""
    channels_last: bool = True
    """Run the UNet and autoencoder in channels-last memory format (faster convolutions
    on tensor cores)."""
    def __post_init__(self) -> None:
        for name in ("model_path", "tiny_autoencoder_path", "variant"):
            value = getattr(self, name)
            check(value is None or bool(value.strip()), name, "must be a non-empty string or null")
        check_choice(self.dtype, "dtype", DTYPES)
        if check_range(self.size, "size", 32, 2048):
            check(self.size % 8 == 0, "size", f"must be a multiple of 8, got {self.size}")
        steps_ok = check_range(self.steps, "steps", 1, 8)
        strength_ok = check_range(self.strength, "strength", 0.0, 1.0)
        if steps_ok and strength_ok:
            check(int(self.steps * self.strength) >= 1, "strength",
                  f"steps * strength must be at least 1 (no UNet step would run), got {self.steps} * {self.strength}")
        check_range(self.guidance_scale, "guidance_scale", 0.0, 20.0)
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        check_range(self.similarity_threshold, "similarity_threshold", 0.0, 1.0)
        check(self.similarity_max_skips >= 0, "similarity_max_skips",
              f"must be >= 0, got {self.similarity_max_skips}")
        check_range(self.regen_rate, "regen_rate", 0.0, 1000.0)
        check(self.regen_burst >= 1, "regen_burst", f"must be >= 1, got {self.regen_burst}")
        check(self.prompt_cache_size >= 1, "prompt_cache_size", f"must be >= 1, got {self.prompt_cache_size}")
        self.check_portrait()
