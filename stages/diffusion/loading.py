"""Loading a diffusers-format img2img model strictly offline, or saying exactly why not.

A downloaded model directory (SD-Turbo, SDXL-Turbo, an LCM model) holds
``model_index.json``, which names each component's library and class, and one folder
per component. Each component the real-time loop needs is loaded from its own folder
with ``from_pretrained(folder, local_files_only=True)``: nothing is ever fetched, and
what is not there is named — the path, the component, and what to do. The safety
checker and feature extractor are never loaded (the portraits are the user's own face).

With ``tiny_autoencoder_path`` an AutoencoderTiny (TAESD) replaces the VAE, which is
then not loaded at all.

diffusers and transformers are imported here, inside ``load_model``, and nowhere else:
importing them costs 10-20 s, and a pipeline without a diffusion stage (or one whose
stage has no model) must not pay for it or need them installed.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

INSTALL_HINT = "pip install -e '.[diffusion]'"

MODEL_LIBRARIES = ("diffusers", "transformers")
"""Libraries a component class may come from: ``model_index.json`` is data, and a class
name in it must not import arbitrary code."""

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class DiffusionModelError(RuntimeError):
    """The model cannot be loaded; the message names the path and what is wrong."""


@dataclass(slots=True)
class DiffusionModel:
    """The components of one loaded model, on one device, in eval mode."""

    path: Path
    unet: Any
    autoencoder: Any
    """The model's AutoencoderKL, or the AutoencoderTiny that replaces it."""
    text_encoders: tuple[Any, ...]
    """One encoder (SD) or two (SDXL: CLIPTextModel, CLIPTextModelWithProjection)."""
    tokenizers: tuple[Any, ...]
    scheduler: Any
    dtype: torch.dtype
    autoencoder_dtype: torch.dtype
    """Float32 when a float16 VAE declares ``force_upcast`` (SDXL's overflows in half)."""
    device: torch.device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a config's ``dtype``: 'auto' is float16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_model(model_path: str, device: torch.device, dtype: torch.dtype, *, variant: str | None = None,
               tiny_autoencoder_path: str | None = None) -> DiffusionModel:
    """Load the components of the model at ``model_path`` onto ``device`` in ``dtype``.
    Raises ``DiffusionModelError`` saying what is missing."""
    for library in MODEL_LIBRARIES:
        try:
            importlib.import_module(library)
        except ImportError as e:
            raise DiffusionModelError(f"diffusion: the diffusion stage needs diffusers and transformers ({e}); "
                                      f"install them with {INSTALL_HINT}") from e
    root = Path(model_path).expanduser()
    if not root.is_dir():
        raise DiffusionModelError(f"diffusion: model_path {str(root)!r} is not a directory; it must be a "
                                  "diffusers-format model folder (e.g. a downloaded stabilityai/sd-turbo)")
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise DiffusionModelError(f"diffusion: {str(root)!r} has no model_index.json: not a diffusers-format "
                                  "model folder (save one with pipeline.save_pretrained)")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as e:
        raise DiffusionModelError(f"diffusion: cannot read {str(index_file)!r}: {e}") from e

    sdxl = _listed(index, "text_encoder_2")
    names = ["unet", "scheduler", "text_encoder", "tokenizer"] + (["text_encoder_2", "tokenizer_2"] if sdxl else [])
    if tiny_autoencoder_path is None:
        names.append("vae")
    components = {name: _load_component(root, index, name, dtype, variant) for name in names}

    if tiny_autoencoder_path is None:
        autoencoder = components["vae"]
    else:
        autoencoder = _load_tiny_autoencoder(Path(tiny_autoencoder_path).expanduser(), dtype)
    autoencoder_dtype = torch.float32 if dtype == torch.float16 and getattr(autoencoder.config, "force_upcast",
                                                                             False) else dtype
    encoders = tuple(components[n] for n in ("text_encoder", "text_encoder_2") if n in components)
    if autoencoder_dtype != dtype:
        autoencoder.to(dtype=autoencoder_dtype)
    for module in (components["unet"], autoencoder, *encoders):
        module.to(device).eval().requires_grad_(False)
    return DiffusionModel(path=root, unet=components["unet"], autoencoder=autoencoder, text_encoders=encoders,
                          tokenizers=tuple(components[n] for n in ("tokenizer", "tokenizer_2") if n in components),
                          scheduler=components["scheduler"], dtype=dtype, autoencoder_dtype=autoencoder_dtype,
                          device=device)


def _listed(index: dict[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and entry[1] is not None


def _load_component(root: Path, index: dict[str, Any], name: str, dtype: torch.dtype, variant: str | None) -> Any:
    """One component, by the class ``model_index.json`` names for it."""
    if not _listed(index, name):
        raise DiffusionModelError(f"diffusion: {str(root / 'model_index.json')!r} lists no {name!r} component; "
                                  "the real-time loop needs unet, vae, text_encoder, tokenizer and scheduler")
    library, class_name = index[name]
    folder = root / name
    if not folder.is_dir():
        raise DiffusionModelError(f"diffusion: {str(root)!r} has no {name}/ folder (the {name} component "
                                  f"{class_name}); the model directory is incomplete")
    if library not in MODEL_LIBRARIES:
        raise DiffusionModelError(f"diffusion: {name} of {str(root)!r} comes from {library!r}; only "
                                  f"{' and '.join(MODEL_LIBRARIES)} components are loaded")
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise DiffusionModelError(f"diffusion: {library} has no class {class_name!r} (the {name} component of "
                                  f"{str(root)!r}); a newer {library} may know it")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        # transformers 5 calls it ``dtype``; diffusers still ``torch_dtype``.
        kwargs["dtype" if library == "transformers" else "torch_dtype"] = dtype
        if variant is not None:
            kwargs["variant"] = variant
    try:
        return cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise DiffusionModelError(f"diffusion: cannot load {name} ({class_name}) from {str(folder)!r}: {e}") from e


def _load_tiny_autoencoder(folder: Path, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderTiny

    if not (folder / "config.json").is_file():
        raise DiffusionModelError(f"diffusion: tiny_autoencoder_path {str(folder)!r} is not an AutoencoderTiny "
                                  "folder (no config.json); e.g. a downloaded madebyollin/taesd")
    try:
        # TAESD ships one set of weights: the model's ``variant`` does not apply to it.
        return AutoencoderTiny.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise DiffusionModelError(f"diffusion: cannot load the tiny autoencoder from {str(folder)!r}: {e}") from e
