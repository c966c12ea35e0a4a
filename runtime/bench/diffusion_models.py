"""Diffusion models with random weights, built from config dicts: nothing is downloaded.

Two sizes, for the benchmark's section 'diffusion' and for the diffusion stage's tests:

* tiny — diffusers' own test architectures (tests/pipelines/stable_diffusion and
  stable_diffusion_xl), saved the way a downloaded model is laid out (``model_index.json``
  plus one folder per component) by ``build_tiny_model``, so whoever uses them loads them
  through the stage's own ``load_model`` path. Seconds on a CPU.
* SD-Turbo-shaped — the real stabilityai/sd-turbo UNet and VAE architectures (SD 2.1's:
  865.9 M UNet parameters) and TAESD's AutoencoderTiny, built straight onto a device by
  ``sd_turbo_modules``: timing needs the shapes, not the trained weights (a dense network
  costs the same whatever its values). Built on the GPU it takes seconds; on a CPU the
  random initialisation alone takes about half a minute.

The tokenizer is the real CLIP one, generated from the BPE vocabulary that open-clip-torch
ships (found without importing open_clip, whose import needs torchvision). Without
open-clip-torch a byte-level CLIP tokenizer (no merges) stands in: prompts become more,
shorter tokens, which changes nothing the benchmark times (embeddings are cached).

diffusers and transformers are imported inside the builders only: importing them costs
seconds, and the benchmark imports this module whether or not they are installed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from stages.diffusion.loading import DiffusionModel
from stages.diffusion.prompts import PromptEmbedding

CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2
"""Merges the CLIP tokenizer uses: 49,152 vocabulary entries less the 256 byte tokens
and the two special tokens."""
PROMPT_TOKENS = 77
"""CLIP's context length: every prompt embedding has this many rows."""

SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
"""Stable Diffusion's noise schedule, as SD-Turbo's scheduler config has it."""

TINY_UNET = {"block_out_channels": (32, 64), "layers_per_block": 2, "sample_size": 32, "in_channels": 4,
             "out_channels": 4, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 32}
TINY_SDXL_UNET = {**TINY_UNET, "attention_head_dim": (2, 4), "use_linear_projection": True,
                  "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                  "transformer_layers_per_block": (1, 2), "cross_attention_dim": 64,
                  # six time ids x 8 + the 32-wide pooled text embedding
                  "projection_class_embeddings_input_dim": 6 * 8 + 32}
TINY_UNETS = {"sd-turbo": TINY_UNET, "sdxl-turbo": TINY_SDXL_UNET, "lcm": {**TINY_UNET, "time_cond_proj_dim": 32}}
"""The tiny UNet of each model family ``build_tiny_model`` makes."""
TINY_VAE = {"block_out_channels": (32, 64), "in_channels": 3, "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
            "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"), "latent_channels": 4}
TINY_TAESD = {"encoder_block_out_channels": (32, 32), "decoder_block_out_channels": (32, 32),
              "num_encoder_blocks": (1, 1), "num_decoder_blocks": (1, 1), "latent_channels": 4}

SD_TURBO_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                 "block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": (5, 10, 20, 20),
                 "cross_attention_dim": 1024, "use_linear_projection": True,
                 "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
"""stabilityai/sd-turbo's unet/config.json (SD 2.1's UNet), the fields that set its shapes."""
SD_TURBO_UNET_PARAMS = 865_910_724
SD_TURBO_VAE = {"block_out_channels": (128, 256, 512, 512), "in_channels": 3, "out_channels": 3,
                "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
                "latent_channels": 4, "layers_per_block": 2, "sample_size": 512, "scaling_factor": 0.18215}
"""stabilityai/sd-turbo's vae/config.json: 8x downsampling to 4 latent channels."""
SD_TURBO_VAE_PARAMS = 83_653_863
SD_TURBO_TEXT_HIDDEN = 1024
"""Width of SD-Turbo's text embeddings (OpenCLIP ViT-H, 23 of its layers), what the UNet's
cross-attention reads."""
TAESD = {"encoder_block_out_channels": (64, 64, 64, 64), "decoder_block_out_channels": (64, 64, 64, 64),
         "num_encoder_blocks": (1, 3, 3, 3), "num_decoder_blocks": (3, 3, 3, 1), "latent_channels": 4,
         "upsampling_scaling_factor": 2, "scaling_factor": 1.0}
"""madebyollin/taesd's config.json: the tiny autoencoder for SD 1.x/2.x latents."""
TAESD_PARAMS = 2_445_063


# ------------------------------------------------------------------------ tokenizer

def clip_bpe_file() -> Path | None:
    """The CLIP BPE file inside open-clip-torch, or None when it is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / CLIP_BPE_FILE
    return path if path.is_file() else None


def _byte_units() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: printable characters stand for every byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_clip_tokenizer(folder: Path) -> int:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of the CLIP
    tokenizer into ``folder`` (as a downloaded model has them): the real one when
    open-clip-torch is installed, else the byte-level one. Returns the vocabulary size."""
    merges: list[tuple[str, ...]] = []
    bpe = clip_bpe_file()
    if bpe is not None:
        with gzip.open(bpe, "rt", encoding="utf-8") as lines:
            merges = [tuple(line.split()) for line in lines.read().split("\n")[1:CLIP_MERGES + 1]]
    units = _byte_units()
    tokens = units + [u + "</w>" for u in units] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": PROMPT_TOKENS,
                                                              "tokenizer_class": "CLIPTokenizer"}))
    return len(tokens)


# ------------------------------------------------------------------------ tiny models

def tiny_text_config(vocab_size: int) -> Any:
    """diffusers' tiny CLIP text encoder config (32 wide, 5 layers)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                          hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
                          num_hidden_layers=5, vocab_size=vocab_size, projection_dim=32)


def build_tiny_model(folder: Path, family: str = "sd-turbo") -> Path:
    """A model directory with tiny random components: 'sd-turbo' (one text encoder, Euler
    with trailing spacing), 'sdxl-turbo' (two text encoders, added time conditioning) or
    'lcm' (LCM scheduler, guidance-embedding UNet). Seeded: the same weights every time."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "safety_checker": [None, None], "feature_extractor": [None, None]}

    def save(name: str, component: Any, library: str) -> None:
        component.save_pretrained(folder / name)
        index[name] = [library, type(component).__name__]

    vocab_size = write_clip_tokenizer(folder / "tokenizer")
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    save("unet", UNet2DConditionModel(**TINY_UNETS[family]), "diffusers")
    save("vae", AutoencoderKL(**TINY_VAE), "diffusers")
    save("text_encoder", CLIPTextModel(tiny_text_config(vocab_size)), "transformers")
    if family == "sdxl-turbo":
        index["_class_name"] = "StableDiffusionXLImg2ImgPipeline"
        write_clip_tokenizer(folder / "tokenizer_2")
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
        save("text_encoder_2", CLIPTextModelWithProjection(tiny_text_config(vocab_size)), "transformers")
    scheduler = LCMScheduler(**SCHEDULE) if family == "lcm" else EulerDiscreteScheduler(
        **SCHEDULE, timestep_spacing="trailing")
    save("scheduler", scheduler, "diffusers")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def build_tiny_autoencoder(folder: Path) -> Path:
    """A tiny AutoencoderTiny (TAESD layout, 32 wide) directory with random weights."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(1)
    AutoencoderTiny(**TINY_TAESD).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ SD-Turbo-shaped

def sd_turbo_modules(device: torch.device, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    """(UNet, {"VAE": AutoencoderKL, "TAESD": AutoencoderTiny}) of SD-Turbo's shapes with
    random weights, made on ``device`` (``torch.device('meta')`` allocates nothing: for
    checking shapes) in ``dtype``, in eval mode without gradients."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    torch.manual_seed(0)
    # Made on the device: initialising 866 M parameters is seconds on a GPU, ~30 s on a CPU.
    with torch.device(device):
        unet = UNet2DConditionModel(**SD_TURBO_UNET)
        autoencoders = {"VAE": AutoencoderKL(**SD_TURBO_VAE), "TAESD": AutoencoderTiny(**TAESD)}
    for module in (unet, *autoencoders.values()):
        module.to(dtype=dtype).eval().requires_grad_(False)
    return unet, autoencoders


def sd_turbo_model(unet: Any, autoencoder: Any, device: torch.device, dtype: torch.dtype) -> DiffusionModel:
    """A ``DiffusionModel`` of these modules, as ``load_model`` would return SD-Turbo (its
    Euler scheduler with trailing spacing), without text encoders: the benchmark conditions
    on ``random_prompts`` (the stage caches embeddings, so no frame runs the text encoder)."""
    from diffusers import EulerDiscreteScheduler

    return DiffusionModel(path=Path("<random SD-Turbo-shaped weights>"), unet=unet, autoencoder=autoencoder,
                          text_encoders=(), tokenizers=(),
                          scheduler=EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="trailing"),
                          dtype=dtype, autoencoder_dtype=dtype, device=device)


def random_prompts(batch: int, device: torch.device, dtype: torch.dtype,
                   width: int = SD_TURBO_TEXT_HIDDEN) -> list[PromptEmbedding]:
    """``batch`` distinct random prompt embeddings ([77, width], CLIP-like magnitude), seeded."""
    generator = torch.Generator("cpu").manual_seed(batch)
    hidden = torch.randn(batch, PROMPT_TOKENS, width, generator=generator).to(device, dtype)
    return [PromptEmbedding(hidden=hidden[i], pooled=None) for i in range(batch)]


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
