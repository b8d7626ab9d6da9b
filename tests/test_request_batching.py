"""Cross-request batching in the engine: `Engine.batch_key` and `Engine.generate_batch` on the tiny model.

Requests that share a batch key run one transformer forward per step over all their images; each
image must still be the one its request gives alone, each request keeps its own callbacks and can be
cancelled on its own (its rows then leave the forward)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kleinserve.engine import GenerationCancelled, GenerationResult, GenerationTask
from kleinserve.engine.cns import CNSParams
from kleinserve.engine.sampling import guided_velocity
from kleinserve.schema import FluxKleinInput
from test_engine import ForwardSpy, pixels, req


def variant(request: FluxKleinInput, **change) -> FluxKleinInput:
    return FluxKleinInput(**{**request.model_dump(), **change})


def assert_same_images(batched: GenerationResult, alone: GenerationResult) -> None:
    assert [im.seed for im in batched.images] == [im.seed for im in alone.images]
    for k, (a, b) in enumerate(zip(batched.images, alone.images, strict=True)):
        diff = np.abs(pixels(a) - pixels(b)).max()
        assert diff <= 2, f"image {k}: max diff {diff}/255"


# Different prompts, negative prompts, seeds, guidance scales, image counts and formats: one key.
MIXED = [
    dict(prompt="a red fox in fresh snow", seed=11, guidance_scale=4.0, num_images=2),
    dict(prompt="a lighthouse at night", negative_prompt="blurry", seed=22, guidance_scale=2.5),
    dict(prompt="two cats on a sofa", seed=33, guidance_scale=6.0, output_format="jpeg"),
]


def test_batched_requests_give_the_images_they_give_alone(tiny_engine):
    requests = [req(**kw) for kw in MIXED]
    assert len({tiny_engine.batch_key(r) for r in requests}) == 1
    with ForwardSpy(tiny_engine) as spy:
        outcomes = tiny_engine.generate_batch([GenerationTask(r) for r in requests])
    # 4 images, cond + uncond: one forward of 8 rows per step, nothing else.
    assert spy.batches == [8] * 4
    for r, outcome in zip(requests, outcomes, strict=True):
        assert "request_batching" in outcome.techniques
        assert any("batched with 2 other request(s)" in line for line in outcome.logs)
        assert outcome.images[0].content_type == f"image/{r.output_format}"
        assert_same_images(outcome, tiny_engine.generate(r))


def test_guidance_off_requests_batch_too(tiny_engine):
    requests = [req(prompt="a fox", seed=5, guidance_scale=1.0), req(prompt="a dog", seed=6, guidance_scale=0.5)]
    with ForwardSpy(tiny_engine) as spy:
        outcomes = tiny_engine.generate_batch([GenerationTask(r) for r in requests])
    assert spy.batches == [2] * 4  # single branch
    for r, outcome in zip(requests, outcomes, strict=True):
        assert_same_images(outcome, tiny_engine.generate(r))


def test_cns_requests_batch_with_their_own_noise(tiny_engine):
    cns = dict(enable_cns=True, cns_s_churn=0.6, guidance_scale=3.0, num_inference_steps=6)
    requests = [req(seed=7, prompt="a fox", **cns), req(seed=8, prompt="a barn", **cns)]
    outcomes = tiny_engine.generate_batch([GenerationTask(r) for r in requests])
    for r, outcome in zip(requests, outcomes, strict=True):
        assert "cns" in outcome.techniques
        assert_same_images(outcome, tiny_engine.generate(r))


@pytest.mark.parametrize("change", [
    dict(image_size={"width": 64, "height": 64}),
    dict(num_inference_steps=5),
    dict(guidance_scale=1.0),  # no negative branch
    dict(acceleration="none"),
    dict(enable_cns=True),
    dict(enable_cns=True, cns_s_churn=0.9),  # against a CNS request with other settings, below
])
def test_requests_that_cannot_share_a_forward_have_different_keys(tiny_engine, change):
    base = req(guidance_scale=3.0, enable_cns="cns_s_churn" in change)
    other = variant(base, **change)
    assert tiny_engine.batch_key(base) != tiny_engine.batch_key(other)
    with pytest.raises(ValueError, match="cannot share a batch"):
        tiny_engine.generate_batch([GenerationTask(base), GenerationTask(other)])


def test_key_ignores_what_each_request_does_on_its_own(tiny_engine):
    base = req(guidance_scale=3.0)
    same = variant(base, prompt="other", negative_prompt="x", seed=1, guidance_scale=7.0, num_images=4,
                   output_format="webp", enable_safety_checker=True, sync_mode=True)
    assert tiny_engine.batch_key(base) == tiny_engine.batch_key(same)
    cns_key = tiny_engine.batch_key(req(enable_cns=True))
    assert CNSParams.from_request(req(enable_cns=True)) in cns_key


def test_high_always_runs_alone(tiny_engine):
    high = req(acceleration="high")
    assert tiny_engine.batch_key(high) is None
    with pytest.raises(ValueError, match="cannot share a batch"):
        tiny_engine.generate_batch([GenerationTask(high), GenerationTask(variant(high, seed=9))])
    # ... but a batch of one is just a generation.
    assert isinstance(tiny_engine.generate_batch([GenerationTask(high)])[0], GenerationResult)


def test_each_request_gets_its_own_progress_and_previews(tiny_engine):
    events: dict[str, list] = {"a": [], "b": []}
    tasks = [
        GenerationTask(req(prompt="a", seed=1, guidance_scale=3.0), on_step=events["a"].append),
        GenerationTask(req(prompt="b", seed=2, guidance_scale=3.0), on_step=events["b"].append,
                       wants_preview=lambda: False),  # nobody watching b: no decode for previews
    ]
    tiny_engine.generate_batch(tasks, preview_every=2)
    assert [e.step for e in events["a"]] == [1, 2, 3, 4] == [e.step for e in events["b"]]
    assert [e.preview is not None for e in events["a"]] == [False, True, False, True]
    assert all(e.preview is None for e in events["b"])


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish_unchanged(tiny_engine):
    steps_b: list[int] = []
    a = req(prompt="a fox", seed=1, guidance_scale=3.0, num_images=2, num_inference_steps=6)
    b = req(prompt="a cat", seed=2, guidance_scale=3.0, num_inference_steps=6)
    tasks = [GenerationTask(a), GenerationTask(b, on_step=lambda e: steps_b.append(e.step),
                                               should_cancel=lambda: len(steps_b) >= 2)]
    with ForwardSpy(tiny_engine) as spy:
        outcome_a, outcome_b = tiny_engine.generate_batch(tasks)
    assert isinstance(outcome_b, GenerationCancelled)
    assert "before step 3/6" in str(outcome_b)
    assert steps_b == [1, 2]  # no callbacks once cancelled
    assert spy.batches == [6, 6, 4, 4, 4, 4]  # b's two rows (cond + uncond) left the forward
    assert_same_images(outcome_a, tiny_engine.generate(a))


def test_the_run_stops_when_every_request_is_cancelled(tiny_engine):
    steps: list[int] = []
    tasks = [GenerationTask(req(seed=k, num_inference_steps=6), on_step=lambda e: steps.append(e.step),
                            should_cancel=lambda: len(steps) >= 4) for k in range(2)]
    with ForwardSpy(tiny_engine) as spy:
        outcomes = tiny_engine.generate_batch(tasks)
    assert all(isinstance(o, GenerationCancelled) for o in outcomes)
    assert len(spy.batches) == 2  # two steps (each reported to both requests), then nothing


def test_generate_still_raises_on_cancel(tiny_engine):
    with pytest.raises(GenerationCancelled, match="before step 1/4"):
        tiny_engine.generate(req(), should_cancel=lambda: True)


def test_generate_batch_of_nothing_is_nothing(tiny_engine):
    assert tiny_engine.generate_batch([]) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_per_row_guidance_rounds_like_each_rows_own_scale(dtype):
    g = torch.Generator().manual_seed(0)
    v_cond, v_uncond = (torch.randn(3, 64, 128, generator=g).to(dtype) for _ in range(2))
    scales = [4.3, 1.7, 6.05]  # not exact in bf16: a bf16 scale tensor would round them first
    per_row = guided_velocity(v_cond, v_uncond, torch.tensor(scales).view(-1, 1, 1))
    assert per_row.dtype == dtype
    for k, scale in enumerate(scales):
        alone = guided_velocity(v_cond[k:k + 1], v_uncond[k:k + 1], scale)
        assert torch.equal(per_row[k:k + 1], alone), f"row {k}"


def test_a_request_whose_own_encoding_fails_does_not_cost_the_others_their_images(tiny_engine):
    good = req(prompt="a fox", seed=1, guidance_scale=3.0)
    # Bypasses validation on purpose: a failure in one request's own finishing stage (here the encoder).
    bad = variant(good, seed=2)
    object.__setattr__(bad, "output_format", "tiff")
    outcome_good, outcome_bad = tiny_engine.generate_batch([GenerationTask(good), GenerationTask(bad)])
    assert isinstance(outcome_bad, ValueError) and "unsupported image format 'tiff'" in str(outcome_bad)
    assert_same_images(outcome_good, tiny_engine.generate(good))
    with pytest.raises(ValueError, match="tiff"):
        tiny_engine.generate(bad)
