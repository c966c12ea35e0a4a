"""The real-time img2img loop and its prompt cache, on tiny random models loaded from disk.

The loop must compute what diffusers' own img2img pipelines compute (same timesteps,
same noising, same UNet conditioning, same scheduler update) while reusing fixed noise
and cached prompt embeddings; the pipelines are the reference.
"""

from __future__ import annotations

import pytest
import torch
from diffusion_testutil import random_crops, require_diffusers

from stages.diffusion.loading import load_model
from stages.diffusion.prompts import PromptEmbeddings, canonical_prompts
from stages.diffusion.realtime import RealtimeImg2Img
from stages.prompt import EMOTIONS, LOOKS, style_prompt

require_diffusers()

CPU = torch.device("cpu")
HAPPY = style_prompt("happy", 0.9, "auto")
SAD = style_prompt("sad", 0.9, "auto")


def _setup(model_dir, autoencoder_dir=None, capacity=128, **loop_options):
    model = load_model(str(model_dir), CPU, torch.float32,
                       tiny_autoencoder_path=None if autoencoder_dir is None else str(autoencoder_dir))
    prompts = PromptEmbeddings(model.tokenizers, model.text_encoders, CPU, torch.float32, capacity)
    options = {"size": 32, "steps": 2, "strength": 0.5, "guidance_scale": 0.0, "seed": 7, **loop_options}
    return model, prompts, RealtimeImg2Img(model, **options)


def _count_calls(module) -> list[int]:
    """A counter of ``module``'s forward calls, as [batch size, ...]."""
    calls: list[int] = []
    module.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    return calls


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tiny_autoencoder_dir):
    return _setup(tiny_model_dir, tiny_autoencoder_dir)


def test_portraits_have_the_crops_shape_in_0_1(tiny):
    _, prompts, loop = tiny
    out = loop.render(random_crops(3), prompts.get([HAPPY.text, SAD.text, HAPPY.text]))
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 0.01


def test_same_input_same_output_whatever_the_batch(tiny):
    _, prompts, loop = tiny
    crops = random_crops(2)
    alone = loop.render(crops[:1], prompts.get([HAPPY.text]))
    assert torch.equal(loop.render(crops[:1], prompts.get([HAPPY.text])), alone)
    # Two sessions sending the same picture get the same portrait, at any place in a batch.
    batch = loop.render(torch.cat([crops[1:], crops[:1], crops[:1]]), prompts.get([SAD.text, HAPPY.text, HAPPY.text]))
    torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[2], alone[0], atol=1e-5, rtol=0)
    assert (batch[0] - alone[0]).abs().mean() > 1e-3


def test_noise_is_fixed_by_the_seed(tiny_model_dir, tiny_autoencoder_dir, tiny):
    _, prompts, loop = tiny
    crops = random_crops(1)
    _, _, same_seed = _setup(tiny_model_dir, tiny_autoencoder_dir)
    _, _, other_seed = _setup(tiny_model_dir, tiny_autoencoder_dir, seed=8)
    reference = loop.render(crops, prompts.get([HAPPY.text]))
    torch.testing.assert_close(same_seed.render(crops, prompts.get([HAPPY.text])), reference, atol=1e-6, rtol=0)
    assert (other_seed.render(crops, prompts.get([HAPPY.text])) - reference).abs().mean() > 1e-3


def test_equals_the_diffusers_img2img_pipeline(tiny):
    from diffusers import StableDiffusionImg2ImgPipeline

    model, prompts, loop = tiny
    pipeline = StableDiffusionImg2ImgPipeline(vae=model.autoencoder, text_encoder=model.text_encoders[0],
                                              tokenizer=model.tokenizers[0], unet=model.unet,
                                              scheduler=model.scheduler, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    crops = random_crops(1, seed=3)
    # The pipeline draws its noise first from the generator: the same numbers as the loop's fixed noise.
    expected = pipeline(prompt=HAPPY.text, image=crops, strength=0.5, num_inference_steps=2, guidance_scale=0.0,
                        generator=torch.Generator().manual_seed(7), output_type="pt").images
    torch.testing.assert_close(loop.render(crops, prompts.get([HAPPY.text])), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps, strength, timesteps", [(2, 0.5, [499]), (1, 1.0, [999]), (4, 1.0, [999, 749, 499, 249]),
                                                        (4, 0.5, [499, 249])])
def test_one_unet_call_per_step_for_the_whole_batch(tiny_model_dir, tiny_autoencoder_dir, steps, strength, timesteps):
    model, prompts, loop = _setup(tiny_model_dir, tiny_autoencoder_dir, steps=steps, strength=strength)
    calls = _count_calls(model.unet)
    seen = []
    model.unet.register_forward_pre_hook(lambda mod, args: seen.append(round(float(args[1]))))
    loop.render(random_crops(4), prompts.get([HAPPY.text, SAD.text, SAD.text, HAPPY.text]))
    assert calls == [4] * len(timesteps) and seen == timesteps
    assert loop.steps_run == 4 * len(timesteps)  # what the stage reports as diffusion steps


def test_the_vae_path_is_deterministic(tiny_model_dir):
    model, prompts, loop = _setup(tiny_model_dir)
    assert type(model.autoencoder).__name__ == "AutoencoderKL"
    crops = random_crops(2)
    first = loop.render(crops, prompts.get([HAPPY.text, SAD.text]))
    assert first.shape == (2, 3, 32, 32)
    assert torch.equal(loop.render(crops, prompts.get([HAPPY.text, SAD.text])), first)


def test_classifier_free_guidance_runs_both_prompts_in_one_call(tiny_model_dir, tiny_autoencoder_dir):
    model, prompts, loop = _setup(tiny_model_dir, tiny_autoencoder_dir, guidance_scale=4.0)
    calls = _count_calls(model.unet)
    with pytest.raises(ValueError, match="negative"):
        loop.render(random_crops(2), prompts.get([HAPPY.text, SAD.text]))
    out = loop.render(random_crops(2), prompts.get([HAPPY.text, SAD.text]), prompts.get([HAPPY.negative] * 2))
    assert out.shape == (2, 3, 32, 32) and calls == [4]


def test_each_prompt_is_encoded_once_while_cached(tiny_model_dir):
    model = load_model(str(tiny_model_dir), CPU, torch.float32)
    prompts = PromptEmbeddings(model.tokenizers, model.text_encoders, CPU, torch.float32, capacity=2)
    calls = _count_calls(model.text_encoders[0])
    for _ in range(5):  # five frames of one mood: one encoder call
        (happy,) = prompts.get([HAPPY.text])
    assert calls == [1] and prompts.encoded == 1
    assert happy.hidden.shape == (77, 32) and happy.pooled is None
    prompts.get([HAPPY.text, SAD.text, SAD.text])  # the mood changes: only the new prompt is encoded
    assert calls == [1, 1] and len(prompts) == 2
    prompts.get([style_prompt("fear", 0.9).text])  # a third prompt evicts the least recently used (happy)
    prompts.get([SAD.text])
    assert calls == [1, 1, 1]
    (again,) = prompts.get([HAPPY.text])
    assert calls == [1, 1, 1, 1] and torch.equal(again.hidden, happy.hidden)
    prompts.warm([HAPPY.text, "a", "b", "c"])  # warming encodes the missing texts together
    assert calls == [1, 1, 1, 1, 3] and prompts.encoded == 7 and len(prompts) == 2


def test_canonical_prompts_cover_every_curated_text():
    texts = canonical_prompts()
    assert len(texts) == len(set(texts)) == len(LOOKS) * len(EMOTIONS) * 3 + 1  # 3 intensity words, 1 negative
    for style in ("auto", *LOOKS):
        for emotion in EMOTIONS:
            for confidence in (0.0, 0.33, 0.61, 0.99):
                assert style_prompt(emotion, confidence, style).text in texts
