"""The loop on the other model families it serves: SDXL-Turbo (two text encoders, added
time conditioning) and LCM (its own strength-aware schedule, guidance embedding, noise
drawn inside the scheduler's step), each against the diffusers pipeline of that family."""

from __future__ import annotations

import pytest
import torch
from diffusion_testutil import random_crops, require_diffusers

from stages.diffusion.loading import load_model
from stages.diffusion.prompts import PromptEmbeddings
from stages.diffusion.realtime import RealtimeImg2Img
from stages.prompt import style_prompt

require_diffusers()

CPU = torch.device("cpu")
PROMPT = style_prompt("surprise", 0.8, "pop")


def _loaded(model_dir, autoencoder_dir):
    model = load_model(str(model_dir), CPU, torch.float32, tiny_autoencoder_path=str(autoencoder_dir))
    return model, PromptEmbeddings(model.tokenizers, model.text_encoders, CPU, torch.float32, 8)


@pytest.mark.parametrize("guidance_scale", [0.0, 3.0])
def test_sdxl_turbo_equals_the_sdxl_img2img_pipeline(tiny_sdxl_dir, tiny_autoencoder_dir, guidance_scale):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    model, prompts = _loaded(tiny_sdxl_dir, tiny_autoencoder_dir)
    (embedding,) = prompts.get([PROMPT.text])
    assert embedding.hidden.shape == (77, 64) and embedding.pooled.shape == (32,)  # both encoders side by side
    loop = RealtimeImg2Img(model, size=32, steps=2, strength=0.5, guidance_scale=guidance_scale, seed=5)
    crops = random_crops(1, seed=4)
    rendered = loop.render(crops, [embedding], prompts.get([PROMPT.negative]))
    pipeline = StableDiffusionXLImg2ImgPipeline(
        vae=model.autoencoder, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
        tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=model.unet, scheduler=model.scheduler,
        requires_aesthetics_score=False)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(prompt=PROMPT.text, negative_prompt=PROMPT.negative, image=crops, strength=0.5,
                        num_inference_steps=2, guidance_scale=guidance_scale, original_size=(32, 32),
                        target_size=(32, 32), generator=torch.Generator().manual_seed(5), output_type="pt").images
    torch.testing.assert_close(rendered, expected, atol=1e-5, rtol=0)


def test_lcm_single_step_equals_the_lcm_img2img_pipeline(tiny_lcm_dir, tiny_autoencoder_dir):
    from diffusers import LatentConsistencyModelImg2ImgPipeline

    model, prompts = _loaded(tiny_lcm_dir, tiny_autoencoder_dir)
    loop = RealtimeImg2Img(model, size=32, steps=1, strength=0.5, guidance_scale=8.0, seed=5)
    assert loop.embedded_guidance and not loop.classifier_free
    crops = random_crops(1, seed=4)
    rendered = loop.render(crops, prompts.get([PROMPT.text]))
    pipeline = LatentConsistencyModelImg2ImgPipeline(
        vae=model.autoencoder, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
        scheduler=model.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(prompt=PROMPT.text, image=crops, strength=0.5, num_inference_steps=1, guidance_scale=8.0,
                        generator=torch.Generator().manual_seed(5), output_type="pt").images
    torch.testing.assert_close(rendered, expected, atol=1e-5, rtol=0)


def test_lcm_multistep_uses_its_own_schedule_and_stays_deterministic(tiny_lcm_dir, tiny_autoencoder_dir):
    model, prompts = _loaded(tiny_lcm_dir, tiny_autoencoder_dir)
    loop = RealtimeImg2Img(model, size=32, steps=4, strength=0.5, guidance_scale=8.0, seed=5)
    seen = []
    model.unet.register_forward_pre_hook(lambda mod, args: seen.append(int(args[1])))
    crops = random_crops(1, seed=4)
    first = loop.render(crops, prompts.get([PROMPT.text]))
    # LCM spreads its steps over the strength's share of its original 50-step schedule.
    assert seen == [499, 379, 259, 139]
    assert torch.equal(loop.render(crops, prompts.get([PROMPT.text])), first)
    # The noise LCM adds between steps is the same for a sample wherever it sits in a batch.
    pair = loop.render(torch.cat([random_crops(1, seed=9), crops]), prompts.get([PROMPT.text] * 2))
    torch.testing.assert_close(pair[1], first[0], atol=1e-5, rtol=0)
