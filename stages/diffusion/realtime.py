"""The real-time img2img loop: a batch of face crops in, stylized portraits out.

Not the diffusers pipeline call, which re-encodes prompts, draws fresh noise, checks
inputs and converts images on every call: here each call does only the model work,
for a whole micro-batch of sessions at once:

1. encode the crops with the VAE (or the tiny autoencoder), scaled by its scaling factor;
2. noise them with FIXED noise — one tensor drawn once from ``seed`` and reused for every
   frame and session, so the same picture is always noised the same way and successive
   frames of a still face do not boil — at the timestep ``strength`` selects, using the
   model's own scheduler (``set_timesteps`` + ``add_noise``);
3. run the remaining UNet step(s), one UNet call per step for the whole batch, each
   sample conditioned on its own cached prompt embedding; the scheduler's ``step`` does
   the update, so Euler (SD-Turbo, SDXL-Turbo), LCM and DDPM models all work;
4. decode and clamp.

The timesteps follow diffusers' img2img pipelines: the last ``steps * strength`` of a
``steps``-long schedule, or, for schedulers that take the strength themselves (LCM),
the schedule ``set_timesteps(steps, strength=...)`` returns. With classifier-free guidance
(``guidance_scale`` > 1) each step runs the batch twice (negative and positive prompt)
in the same call; LCM models with a guidance embedding get it as ``timestep_cond``.

Speed knobs: half precision and channels-last on CUDA (attention runs through PyTorch's
SDPA, diffusers' default on torch 2), ``torch.compile`` of the UNet and CUDA-graph replay
of it (``cuda_graph.CudaGraphed``), each behind a config flag.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from stages.diffusion.cuda_graph import CudaGraphed
from stages.diffusion.loading import DiffusionModel
from stages.diffusion.prompts import PromptEmbedding, stack


class RealtimeImg2Img:
    """Renders [B, 3, size, size] crops (float 0..1) into portraits of the same shape
    with one loaded model; see the module docstring for the steps."""

    def __init__(self, model: DiffusionModel, *, size: int, steps: int, strength: float, guidance_scale: float,
                 seed: int, compile: bool = False, cuda_graphs: bool = False, channels_last: bool = True) -> None:
        self.model = model
        self.size = size
        self.steps = steps
        self.strength = strength
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.device = model.device
        self.scheduler = model.scheduler
        self.steps_run = 0
        """UNet denoising steps run so far, one per image per timestep (``mindmirror_diffusion_steps_total``)."""
        if channels_last:
            model.unet.to(memory_format=torch.channels_last)
            model.autoencoder.to(memory_format=torch.channels_last)
        self._scaling = float(getattr(model.autoencoder.config, "scaling_factor", 1.0))
        set_timesteps = inspect.signature(self.scheduler.set_timesteps).parameters
        self._scheduler_takes_strength = "strength" in set_timesteps
        self._step_takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        self._generators: list[torch.Generator] = []
        config = model.unet.config
        self.embedded_guidance = getattr(config, "time_cond_proj_dim", None) is not None
        self.classifier_free = guidance_scale > 1.0 and not self.embedded_guidance
        self._guidance_embedding = (_guidance_embedding(guidance_scale - 1.0, config.time_cond_proj_dim)
                                    .to(self.device, model.dtype) if self.embedded_guidance else None)
        self._time_ids = (torch.tensor([[size, size, 0, 0, size, size]], device=self.device, dtype=model.dtype)
                          if getattr(config, "addition_embed_type", None) == "text_time" else None)
        self._unet = torch.compile(model.unet, dynamic=False) if compile else model.unet
        predict: Callable[..., torch.Tensor] = self._predict
        if cuda_graphs and self.device.type == "cuda":
            predict = CudaGraphed(predict)
        self._unet_call = predict
        self._noise = self._fixed_noise()

    def render(self, crops: torch.Tensor, prompts: Sequence[PromptEmbedding],
               negatives: Sequence[PromptEmbedding] | None = None) -> torch.Tensor:
        """Portraits of ``crops`` [B, 3, size, size] (float 0..1, any device), the i-th
        conditioned on ``prompts[i]`` (and ``negatives[i]`` with classifier-free guidance);
        float32 0..1 on the model's device."""
        batch = crops.shape[0]
        if len(prompts) != batch or (self.classifier_free and (negatives is None or len(negatives) != batch)):
            raise ValueError(f"{batch} crops need {batch} prompts"
                             + (" and as many negative prompts" if self.classifier_free else ""))
        with torch.inference_mode():
            latents = self._encode(crops)
            timesteps = self._timesteps()
            noise = self._noise.expand(batch, -1, -1, -1)
            latents = self.scheduler.add_noise(latents, noise, timesteps[:1].repeat(batch))
            hidden, pooled = stack(list(negatives) + list(prompts) if self.classifier_free else prompts)
            step_kwargs = {"generator": self._reseeded(batch)} if self._step_takes_generator else {}
            for t in timesteps:
                sample = torch.cat([latents, latents]) if self.classifier_free else latents
                sample = self.scheduler.scale_model_input(sample, t)
                prediction = self._unet_call(sample, t, hidden, pooled)
                if self.classifier_free:
                    unconditional, conditional = prediction.chunk(2)
                    prediction = unconditional + self.guidance_scale * (conditional - unconditional)
                latents = self.scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
            self.steps_run += batch * len(timesteps)
            return self._decode(latents)

    def _encode(self, crops: torch.Tensor) -> torch.Tensor:
        x = crops.to(self.device, self.model.autoencoder_dtype).mul(2.0).sub_(1.0)
        encoded = self.model.autoencoder.encode(x)
        # AutoencoderKL gives a distribution: its mean, not a sample, keeps frames stable.
        latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
        return (latents * self._scaling).to(self.model.dtype)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = (latents / self._scaling).to(self.model.autoencoder_dtype)
        images = self.model.autoencoder.decode(latents).sample
        return images.float().add_(1.0).mul_(0.5).clamp_(0.0, 1.0)

    def _timesteps(self) -> torch.Tensor:
        """This frame's timesteps. The schedule is set again every frame: schedulers keep
        a step index that ``step`` advances, and a fresh schedule rewinds it."""
        if self._scheduler_takes_strength:
            self.scheduler.set_timesteps(self.steps, device=self.device, strength=self.strength)
            return self.scheduler.timesteps
        self.scheduler.set_timesteps(self.steps, device=self.device)
        start = (self.steps - min(int(self.steps * self.strength), self.steps)) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return self.scheduler.timesteps[start:]

    def _predict(self, sample: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor,
                 pooled: torch.Tensor | None) -> torch.Tensor:
        batch = sample.shape[0]
        added: dict[str, Any] | None = None
        if self._time_ids is not None:
            added = {"text_embeds": pooled, "time_ids": self._time_ids.expand(batch, -1)}
        condition = None if self._guidance_embedding is None else self._guidance_embedding.expand(batch, -1)
        return self._unet(sample, t, encoder_hidden_states=hidden, timestep_cond=condition,
                               added_cond_kwargs=added, return_dict=False)[0]

    def _fixed_noise(self) -> torch.Tensor:
        """The latent-shaped noise every frame is noised with, drawn once from ``seed`` on
        the CPU (the same numbers on every device). Its shape comes from encoding a blank
        crop, which also warms the autoencoder up."""
        with torch.inference_mode():
            shape = self._encode(torch.zeros(1, 3, self.size, self.size, device=self.device)).shape
        generator = torch.Generator("cpu").manual_seed(self.seed)
        return torch.randn(shape, generator=generator).to(self.device, self.model.dtype)

    def _reseeded(self, batch: int) -> list[torch.Generator]:
        """One generator per sample for schedulers that draw noise in ``step`` (LCM with
        several steps), each reseeded every frame: a sample's result does not depend on
        the frame before or on its place in the batch. Seeded apart from the fixed noise,
        so a step's noise is not the initial noise again."""
        while len(self._generators) < batch:
            self._generators.append(torch.Generator(self.device))
        return [g.manual_seed(self.seed + 1) for g in self._generators[:batch]]


def _guidance_embedding(w: float, dim: int) -> torch.Tensor:
    """LCM's guidance-scale embedding (sinusoidal in ``w * 1000``), [1, dim], as diffusers computes it."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = w * 1000.0 * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(embedding, (0, dim % 2))
