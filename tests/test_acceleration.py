"""Acceleration levels on CPU with the tiny model: what each level runs, and how close it stays to `none`.

Tolerances (docs/PERFORMANCE.md):
- `regular` without compiling (the CPU default) runs the same kernels as `none`: identical pixels.
- `regular` with inductor (KLEINSERVE_COMPILE=1), float32: transformer output within 1e-4 (relative to its
  largest value), decoded pixels within 2/255.
- `high` on CPU (no FP8): the block cache with the default threshold never fires on the tiny model (its
  random weights move the first block's residual by 40-200% per step), so the output is identical; forced
  to skip (threshold 2.0), the image stays above the PSNR bound below.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from kleinserve.engine import acceleration as acc_mod
from kleinserve.engine.acceleration import LEVELS, Accelerator, FirstBlockCache, fp8_filter
from kleinserve.schema import FluxKleinInput

SIZE = {"width": 64, "height": 64}
FORCED_SKIP_PSNR_DB = 20.0  # tiny model, threshold 2.0, 8 steps: skips 4 of 8; measured 27.1 dB


def _request(level: str, **kw) -> FluxKleinInput:
    base = dict(prompt="a red fox in the snow", seed=7, acceleration=level, image_size=SIZE,
                num_inference_steps=4, enable_safety_checker=False)
    base.update(kw)
    return FluxKleinInput(**base)


def _pixels(result) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB")).astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def tiny_transformer():
    from kleinserve.engine import tiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.TINY_SEED + 1)
        return tiny.build_transformer()


def _inputs(acc: Accelerator, batch=2, width=64, height=48, text_len=16):
    return acc.dummy_inputs(batch, width, height, text_len)


# ------------------------------------------------------------------------------------------ levels


def test_unknown_level_rejected_by_schema_and_accelerator(tiny_transformer):
    with pytest.raises(ValidationError):
        FluxKleinInput(prompt="x", acceleration="turbo")
    assert FluxKleinInput(prompt="x").acceleration == "regular"
    with pytest.raises(ValueError, match="unknown acceleration level"):
        Accelerator(tiny_transformer, "cpu", torch.float32).forward("turbo")


def test_techniques_on_cpu_say_what_was_skipped(tiny_transformer, monkeypatch):
    monkeypatch.delenv("KLEINSERVE_COMPILE", raising=False)
    acc = Accelerator(tiny_transformer, "cpu", torch.float32)
    assert acc.compile is False
    assert acc.forward("none")[1] == []
    assert acc.forward("regular")[1] == [
        "regional_compile:skipped(cpu; KLEINSERVE_COMPILE=1 forces it)", "sdpa_cudnn:skipped(cpu)"]
    assert acc.forward("high")[1] == [
        "fp8_rowwise:skipped(no CUDA sm_89+)", "regional_compile:skipped(cpu; KLEINSERVE_COMPILE=1 forces it)",
        "sdpa_cudnn:skipped(cpu)", "first_block_cache(0.08)"]
    monkeypatch.setenv("KLEINSERVE_COMPILE", "1")
    monkeypatch.setenv("KLEINSERVE_CACHE_THRESHOLD", "0.12")
    acc = Accelerator(tiny_transformer, "cpu", torch.float32, fp8=False)
    assert acc.compile is True and acc.cache_threshold == 0.12
    assert acc.forward("high")[1][0] == "fp8_rowwise:skipped(KLEINSERVE_FP8=0)"  # builds, compiles lazily


def test_levels_are_built_once_and_fn_is_fresh_per_generation(tiny_transformer):
    acc = Accelerator(tiny_transformer, "cpu", torch.float32)
    fn1, _ = acc.forward("high")
    fn2, _ = acc.forward("high")
    assert fn1.model is fn2.model  # the clone is built once
    assert fn1.cache is not fn2.cache  # each generation gets its own block cache state
    assert set(acc.build_seconds) == {"high"}


def test_none_and_regular_identical_without_compile(tiny_engine):
    assert tiny_engine.accelerator.compile is False
    none = tiny_engine.generate(_request("none"))
    regular = tiny_engine.generate(_request("regular"))
    assert np.array_equal(_pixels(none), _pixels(regular))  # (the PNG metadata names the level)
    assert "cfg_batched" in regular.techniques and "sdpa_cudnn:skipped(cpu)" in regular.techniques


# ------------------------------------------------------------------------------------------ high


def test_high_clone_shares_weights_and_fp8_leaves_reference_untouched(tiny_transformer):
    acc = Accelerator(tiny_transformer, "cpu", torch.float32)
    clone = acc._shared_clone()
    ref_params = dict(tiny_transformer.named_parameters())
    for name, p in clone.named_parameters():
        assert p is ref_params[name]  # no extra memory
    # What quantize_ does: swap the weight of each selected Linear of the clone for a new tensor.
    selected = [name for name, m in clone.named_modules() if fp8_filter(m, name)]
    assert selected and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in selected)
    assert "x_embedder" not in selected and "proj_out" not in selected
    kw = _inputs(acc)
    before = tiny_transformer(**kw)[0]
    with torch.no_grad():
        for name, m in clone.named_modules():
            if fp8_filter(m, name):
                m.weight = torch.nn.Parameter(m.weight.detach() * 0.5)
    assert torch.equal(tiny_transformer(**kw)[0], before)
    assert not torch.equal(clone(**kw)[0], before)


def test_cached_forward_without_skipping_matches_the_model(tiny_transformer):
    acc = Accelerator(tiny_transformer, "cpu", torch.float32, cache_threshold=0.0)
    fn, techniques = acc.forward("high")
    assert "first_block_cache(0)" in techniques
    kw = _inputs(acc)
    for t in (1.0, 0.7, 0.4):
        kw["timestep"] = torch.full((2,), t)
        with torch.no_grad():
            expected = tiny_transformer(**kw)[0]
        assert torch.equal(fn(**kw)[0], expected)
    assert fn.cache.skipped == 0 and fn.cache.forwards == 3


def test_block_cache_rules():
    cache = FirstBlockCache(threshold=0.5, warmup_steps=1, max_consecutive=2)
    r = torch.ones(1, 4, 8)
    ts = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    decisions = []
    for t in ts:
        slot = cache.begin(((1, 4, 8), 3), t)
        skip = cache.should_skip(slot, r * (1 + 0.01 * t))
        decisions.append(skip)
        if skip:
            slot.consecutive += 1
        else:
            cache.store(slot, r, r)
    # step 0: nothing cached; then skips, capped at 2 in a row
    assert decisions == [False, True, True, False, True, True]
    # a timestep going up, or a new shape, starts a new generation
    slot = cache.begin(((1, 4, 8), 3), 1.0)
    assert cache.forwards == 1 and slot.tail is None
    cache.begin(((2, 4, 8), 3), 0.9)
    assert cache.forwards == 1
    # two forwards at the same timestep (cond and uncond run separately) get separate states
    a = cache.begin(((2, 4, 8), 3), 0.8)
    b = cache.begin(((2, 4, 8), 3), 0.8)
    assert a is not b and cache._step == 1


def test_taylor_extrapolates_the_cached_residual():
    cache = FirstBlockCache(threshold=1.0, warmup_steps=0, taylor=True)
    slot = cache.begin(((1,), 1), 1.0)
    cache.store(slot, torch.ones(1), torch.tensor([1.0]))
    slot = cache.begin(((1,), 1), 0.9)
    cache.store(slot, torch.ones(1), torch.tensor([2.0]))
    cache.begin(((1,), 1), 0.8)
    assert torch.equal(cache.cached_tail(slot), torch.tensor([3.0]))


def test_high_on_tiny_engine_identical_at_default_threshold(tiny_engine):
    none = tiny_engine.generate(_request("none"))
    high = tiny_engine.generate(_request("high"))
    assert "first_block_cache(0.08)" in high.techniques and "fp8_rowwise:skipped(no CUDA sm_89+)" in high.techniques
    assert any(line.startswith("first_block_cache(0.08): skipped the other blocks at 0 of 4") for line in high.logs)
    assert np.array_equal(_pixels(none), _pixels(high))


def test_high_forced_to_skip_stays_within_psnr_bound(tiny_engine):
    saved = tiny_engine.accelerator
    try:
        tiny_engine.accelerator = Accelerator(tiny_engine.transformer, "cpu", torch.float32, cache_threshold=2.0)
        high = tiny_engine.generate(_request("high", num_inference_steps=8))  # 3 warm-up steps never skip
    finally:
        tiny_engine.accelerator = saved
    none = tiny_engine.generate(_request("none", num_inference_steps=8))
    note = next(line for line in high.logs if line.startswith("first_block_cache(2)"))
    skipped = int(note.split("at ")[1].split(" of")[0])
    assert skipped >= 2, note
    value = psnr(_pixels(high), _pixels(none))
    assert FORCED_SKIP_PSNR_DB <= value < float("inf"), value


# ------------------------------------------------------------------------------------------ compile


def test_no_recompile_after_warmup(tiny_transformer):
    """Warm 2 sizes x batches {2, 4, 1}; then other sizes and batches run without any recompile.

    Uses dynamo with the `eager` backend: the guards and recompiles are dynamo's, the same as with
    inductor, and it compiles in seconds."""
    import torch._dynamo

    torch._dynamo.reset()
    clone = Accelerator(tiny_transformer, "cpu", torch.float32)._shared_clone()  # keep the fixture uncompiled
    acc = Accelerator(clone, "cpu", torch.float32, compile=True, compile_backend="eager")
    report = acc.warmup([(64, 48), (64, 64)], levels=("regular",), text_len=16)  # 12 and 16 image tokens
    assert "regular:64x48x2" in report and acc.forward("regular")[0].stance == "eager_on_recompile"
    fn, _ = acc.forward("regular")
    with torch.compiler.set_stance("fail_on_recompile"):
        for batch, width, height in [(2, 80, 32), (3, 96, 64), (1, 32, 32), (8, 64, 64)]:
            with torch.inference_mode():
                fn.model(**acc.dummy_inputs(batch, width, height, 16))
    torch._dynamo.reset()


def test_regular_compiled_with_inductor_matches_none():
    """KLEINSERVE_COMPILE=1 on CPU: inductor (C++ codegen) compiles both block classes once."""
    import shutil

    import torch._dynamo

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor on CPU needs a C++ compiler")
    from kleinserve.engine import load_engine

    torch._dynamo.reset()
    engine = load_engine("tiny", device="cpu", dtype="float32")  # its own: compiling mutates the blocks
    engine.accelerator = Accelerator(engine.transformer, "cpu", torch.float32, compile=True)
    acc = engine.accelerator
    kw = acc.dummy_inputs(2, SIZE["width"], SIZE["height"], 512)  # the engine's shapes: compiled once
    t0 = time.perf_counter()
    fn, techniques = acc.forward("regular")
    assert techniques[0] == "regional_compile"
    out = fn(**kw)[0]
    compile_s = time.perf_counter() - t0
    ref = acc.forward("none")[0](**kw)[0]
    scale = max(1.0, float(ref.abs().max()))
    assert float((out - ref).abs().max()) <= 1e-4 * scale

    none = engine.generate(_request("none"))
    regular = engine.generate(_request("regular"))
    assert "regional_compile" in regular.techniques and "regional_compile" not in none.techniques
    diff = np.abs(_pixels(none) - _pixels(regular)).max()
    assert diff <= 2, diff
    print(f"inductor compile on CPU: {compile_s:.1f} s; max pixel diff {diff:.0f}/255")
    torch._dynamo.reset()


def test_levels_constant_matches_schema():
    from typing import get_args

    field = FluxKleinInput.model_fields["acceleration"]
    assert tuple(get_args(field.annotation)) == LEVELS
    assert acc_mod.DEFAULT_CACHE_THRESHOLD == 0.08
