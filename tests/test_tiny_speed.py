"""The first image is quick: the default request on the tiny model (1024x768, 28 steps, CFG, previews)
takes seconds on a CPU, because the tiny transformer has one block of each kind and a preview decodes a
pooled latent instead of the full-size image. What the tiny model tests (parity, CFG, prompt
sensitivity) is covered by test_engine.py and test_parity.py on the same model."""

from __future__ import annotations

import time

import pytest

from kleinserve.engine import engine as engine_mod
from kleinserve.engine import tiny
from kleinserve.schema import FluxKleinInput


@pytest.mark.parametrize("h16, w16, expected", [
    (48, 64, 4),    # 1024x768 -> a 256x192 decode
    (64, 64, 4),    # 1024x1024 -> 256x256
    (36, 64, 4),    # 1024x576 -> 256x144
    (16, 16, 1),    # 256x256: already preview-sized
    (4, 4, 1),      # 64x64
    (48, 66, 2),    # 1056x768: 66 is not divisible by 4
    (128, 128, 8),  # 2048x2048
])
def test_preview_pool(h16, w16, expected):
    pool = engine_mod.preview_pool(h16, w16, 16)
    assert pool == expected
    assert max(h16, w16) * 16 // pool >= engine_mod.PREVIEW_MAX_SIDE or pool == 1


def test_tiny_transformer_has_one_block_of_each_kind(tiny_engine):
    t = tiny_engine.transformer
    assert len(t.transformer_blocks) == tiny.TRANSFORMER_DOUBLE_BLOCKS == 1
    assert len(t.single_transformer_blocks) == tiny.TRANSFORMER_SINGLE_BLOCKS == 1
    assert t.config.num_attention_heads == 2  # still multi-head
    assert tiny_engine.vae_scale_factor == 8  # the real geometry: sizes round as with FLUX.2


def test_default_request_is_quick_and_previews_decode_small(tiny_engine):
    decoded = []
    vae = tiny_engine.vae
    original = vae.decode

    def spy(z, *a, **kw):
        decoded.append(tuple(z.shape[-2:]))
        return original(z, *a, **kw)

    request = FluxKleinInput(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=1)
    assert request.resolved_size() == (1024, 768) and request.num_inference_steps == 28 and request.uses_cfg
    events = []
    vae.decode = spy
    try:
        started = time.perf_counter()
        result = tiny_engine.generate(request, on_step=events.append, preview_every=4)
        seconds = time.perf_counter() - started
    finally:
        del vae.decode
    previews = [e.preview for e in events if e.preview is not None]
    assert len(previews) == 7 and all(p.size == (256, 192) for p in previews)
    # 7 previews from a 4x pooled latent (24x32 -> 192x256 px), then one full-size decode (96x128 -> 768x1024).
    assert decoded == [(24, 32)] * 7 + [(96, 128)]
    assert (result.images[0].width, result.images[0].height) == (1024, 768)
    # ~3 s on an idle 2-core CPU (it was ~9 s with previews); the bound leaves room for a busy machine.
    assert seconds < 40, f"the default tiny request took {seconds:.1f}s"
