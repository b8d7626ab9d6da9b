"""The correctness anchor: our engine reproduces diffusers' Flux2KleinPipeline.

Same components (the tiny model saved in diffusers layout and loaded by the pipeline), float32 on CPU,
negative_prompt="" (the pipeline's fixed negative), CNS off, same seed, prompt, size, steps, guidance:
the decoded images agree to within 2/255, both as floats before 8-bit quantisation and as the 8-bit
images we encode.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from kleinserve.schema import FluxKleinInput

TOLERANCE = 2 / 255


@pytest.fixture(scope="module")
def diffusers_pipeline(tiny_model_dir):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "guidance,width,height,steps,seed",
    [
        (4.0, 96, 64, 5, 7),  # CFG (> 1): batched cond + uncond vs the pipeline's two forwards
        (1.0, 64, 80, 4, 11),  # single branch
        (2.5, 128, 128, 6, 2**40 + 3),
    ],
)
def test_matches_diffusers_pipeline(tiny_engine, diffusers_pipeline, guidance, width, height, steps, seed):
    prompt = "a small cactus with a happy face in the sahara desert"
    request = FluxKleinInput(
        prompt=prompt, negative_prompt="", guidance_scale=guidance, num_inference_steps=steps, seed=seed,
        image_size={"width": width, "height": height}, enable_cns=False, enable_safety_checker=False,
        output_format="png",
    )
    reference = diffusers_pipeline(
        prompt=prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
    ).images
    assert reference.shape == (1, height, width, 3)

    ours = tiny_engine.decode_float(tiny_engine.sample_latents(request), request)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= TOLERANCE

    result = tiny_engine.generate(request)
    assert result.seed == seed
    ours_8bit = np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB")).astype(np.int16)
    ref_8bit = (reference[0] * 255).round().astype(np.int16)
    assert np.abs(ours_8bit - ref_8bit).max() <= 2


def test_parity_is_not_vacuous(tiny_engine, diffusers_pipeline):
    """Guidance and prompt change the pipeline's image by much more than the tolerance, so a
    mistake in either (e.g. cond/uncond swapped) could not pass the parity test."""
    kw = dict(height=64, width=64, num_inference_steps=4, output_type="np")
    base = diffusers_pipeline(prompt="a red fox", guidance_scale=4.0,
                              generator=torch.Generator("cpu").manual_seed(1), **kw).images
    unguided = diffusers_pipeline(prompt="a red fox", guidance_scale=1.0,
                                  generator=torch.Generator("cpu").manual_seed(1), **kw).images
    other = diffusers_pipeline(prompt="a lighthouse", guidance_scale=4.0,
                               generator=torch.Generator("cpu").manual_seed(1), **kw).images
    assert np.abs(base - unguided).max() > 10 * TOLERANCE
    assert np.abs(base - other).max() > 10 * TOLERANCE
