"""Engine behaviour on the tiny model: seeds, batching, CFG branches, callbacks, cancellation, sizes,
the truncated text encoder and its cache, safety replacement, model specs and their errors."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from kleinserve.engine import GenerationCancelled, ModelUnavailable, StepEvent, load_engine, models
from kleinserve.schema import IMAGE_SIZE_PRESETS, FluxKleinInput

SMALL = {"width": 96, "height": 64}


def req(**kw) -> FluxKleinInput:
    base = dict(prompt="a red fox in fresh snow", seed=1234, image_size=SMALL, num_inference_steps=4,
                guidance_scale=1.0, enable_safety_checker=False, output_format="png")
    base.update(kw)
    return FluxKleinInput(**base)


def pixels(encoded) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded.data)).convert("RGB")).astype(np.int16)


class ForwardSpy:
    """Records the batch size of every transformer forward."""

    def __init__(self, engine):
        self.batches: list[int] = []
        self.handle = engine.transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.batches.append(int(hidden.shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --------------------------------------------------------------------------------------------- seeds


def test_batching_never_changes_an_image(tiny_engine):
    batched = tiny_engine.generate(req(num_images=3, guidance_scale=3.0))
    assert [im.seed for im in batched.images] == [1234, 1235, 1236]
    for k in range(3):
        alone = tiny_engine.generate(req(num_images=1, guidance_scale=3.0, seed=1234 + k))
        diff = np.abs(pixels(batched.images[k]) - pixels(alone.images[0])).max()
        assert diff <= 2, f"image {k}: max diff {diff}/255"


def test_batched_latents_match_single_runs(tiny_engine):
    batched = tiny_engine.sample_latents(req(num_images=2, guidance_scale=2.0))
    for k in range(2):
        alone = tiny_engine.sample_latents(req(num_images=1, guidance_scale=2.0, seed=1234 + k))
        torch.testing.assert_close(batched[k : k + 1], alone, rtol=0, atol=1e-4)


def test_random_seed_is_returned_and_reproduces(tiny_engine):
    first = tiny_engine.generate(req(seed=None))
    assert isinstance(first.seed, int) and 0 <= first.seed < 2**31
    assert first.images[0].seed == first.seed
    again = tiny_engine.generate(req(seed=first.seed))
    assert again.seed == first.seed
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))


def test_different_seeds_and_prompts_give_different_images(tiny_engine):
    a = pixels(tiny_engine.generate(req()).images[0])
    b = pixels(tiny_engine.generate(req(seed=99)).images[0])
    c = pixels(tiny_engine.generate(req(prompt="a lighthouse at night")).images[0])
    assert np.abs(a - b).mean() > 5
    assert np.abs(a - c).max() > 10  # the prompt visibly steers even the tiny model


def test_recipe_in_metadata_reproduces_the_image(tiny_engine):
    from kleinserve.engine.imageio import read_recipe

    result = tiny_engine.generate(req(num_images=2, guidance_scale=2.0))
    recipe = read_recipe(result.images[1].data)
    assert recipe["seed"] == 1235 and recipe["num_images"] == 1 and recipe["model"] == "tiny"
    assert recipe["image_size"] == SMALL and recipe["prompt"] == "a red fox in fresh snow"
    allowed = set(FluxKleinInput.model_fields)
    again = tiny_engine.generate(FluxKleinInput(**{k: v for k, v in recipe.items() if k in allowed}))
    assert np.abs(pixels(again.images[0]) - pixels(result.images[1])).max() <= 2


# ----------------------------------------------------------------------------------- CFG branches


def test_cfg_runs_one_batched_forward_per_step(tiny_engine):
    with ForwardSpy(tiny_engine) as spy:
        result = tiny_engine.generate(req(num_images=2, guidance_scale=4.0, num_inference_steps=5))
    assert spy.batches == [4] * 5  # cond + uncond of 2 images, one forward per step
    assert "cfg_batched" in result.techniques


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_guidance_at_most_one_runs_a_single_branch(tiny_engine, guidance):
    with ForwardSpy(tiny_engine) as spy:
        result = tiny_engine.generate(req(num_images=2, guidance_scale=guidance, negative_prompt="ignored"))
    assert spy.batches == [2] * 4
    assert "cfg_batched" not in result.techniques
    # The negative prompt is not used (nor encoded) without CFG.
    plain = tiny_engine.generate(req(num_images=2, guidance_scale=guidance))
    assert np.array_equal(pixels(result.images[1]), pixels(plain.images[1]))


def test_negative_prompt_changes_the_image_with_cfg(tiny_engine):
    a = pixels(tiny_engine.generate(req(guidance_scale=4.0)).images[0])
    b = pixels(tiny_engine.generate(req(guidance_scale=4.0, negative_prompt="blurry, low quality")).images[0])
    assert np.abs(a - b).max() > 10


# ------------------------------------------------------------------------ callbacks, cancellation


def test_step_callbacks_and_previews(tiny_engine):
    events: list[StepEvent] = []
    tiny_engine.generate(req(num_inference_steps=6, guidance_scale=2.0), on_step=events.append, preview_every=2)
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    assert all(e.total == 6 for e in events)
    sigmas = [e.sigma for e in events]
    assert all(a > b for a, b in zip(sigmas, sigmas[1:], strict=False)) and sigmas[-1] == 0.0
    assert [e.step for e in events if e.preview is not None] == [2, 4, 6]
    for e in events:
        if e.preview is not None:
            assert e.preview.mode == "RGB" and max(e.preview.size) <= 256


def test_no_previews_unless_asked(tiny_engine):
    events: list[StepEvent] = []
    tiny_engine.generate(req(), on_step=events.append)
    assert len(events) == 4 and all(e.preview is None for e in events)


def test_cancellation_between_steps(tiny_engine):
    events: list[StepEvent] = []
    with pytest.raises(GenerationCancelled):
        tiny_engine.generate(req(num_inference_steps=8), on_step=events.append,
                             should_cancel=lambda: len(events) >= 3)
    assert [e.step for e in events] == [1, 2, 3]
    # The engine is still usable afterwards.
    assert len(tiny_engine.generate(req()).images) == 1


# --------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("preset", sorted(IMAGE_SIZE_PRESETS))
def test_preset_latent_grids(tiny_engine, preset):
    width, height = IMAGE_SIZE_PRESETS[preset]
    assert tiny_engine.latent_grid(req(image_size=preset)) == (height // 8, width // 8, 32)


def test_preset_output_size(tiny_engine):
    result = tiny_engine.generate(req(image_size="landscape_16_9"))
    image = result.images[0]
    assert (image.width, image.height) == (1024, 576)
    assert Image.open(io.BytesIO(image.data)).size == (1024, 576)


@pytest.mark.parametrize("asked,expected", [((100, 70), (96, 64)), ((64, 64), (64, 64)), ((72, 88), (80, 96))])
def test_custom_sizes_are_rounded_to_16(tiny_engine, asked, expected):
    result = tiny_engine.generate(req(image_size={"width": asked[0], "height": asked[1]}, output_format="jpeg"))
    image = result.images[0]
    assert (image.width, image.height) == expected
    assert image.content_type == "image/jpeg" and image.extension == "jpeg"
    assert Image.open(io.BytesIO(image.data)).size == expected


@pytest.mark.parametrize("fmt,content_type", [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_output_formats(tiny_engine, fmt, content_type):
    image = tiny_engine.generate(req(output_format=fmt)).images[0]
    assert image.content_type == content_type and image.extension == fmt
    assert Image.open(io.BytesIO(image.data)).format == fmt.upper()


def test_timings_and_logs(tiny_engine):
    result = tiny_engine.generate(req(guidance_scale=2.0))
    assert set(result.timings) == {"encode", "denoise", "decode", "safety", "total"}
    assert all(v >= 0 for v in result.timings.values())
    assert result.timings["total"] >= result.timings["denoise"]
    assert any("tiny" in line for line in result.logs)


# ---------------------------------------------------------------------------------------- safety


def test_flagged_images_become_black(tiny_engine, monkeypatch):
    from kleinserve.engine.safety import SafetyChecker

    monkeypatch.setattr(tiny_engine, "_safety", SafetyChecker(threshold=0.0))  # flags everything
    result = tiny_engine.generate(req(num_images=2, enable_safety_checker=True))
    for image in result.images:
        assert image.nsfw
        assert pixels(image).max() == 0 and (image.width, image.height) == (96, 64)


def test_unflagged_images_are_kept(tiny_engine, monkeypatch):
    from kleinserve.engine.safety import SafetyChecker

    monkeypatch.setattr(tiny_engine, "_safety", SafetyChecker(threshold=1.01))  # flags nothing
    checked = tiny_engine.generate(req(enable_safety_checker=True))
    unchecked = tiny_engine.generate(req(enable_safety_checker=False))
    assert not checked.images[0].nsfw
    assert np.array_equal(pixels(checked.images[0]), pixels(unchecked.images[0]))


# ---------------------------------------------------------------------------------- text encoder


def test_truncated_text_encoder_equals_full_model():
    from diffusers import Flux2KleinPipeline

    from kleinserve.engine.text import PromptEncoder
    from kleinserve.engine.tiny import build_tiny_components

    full = build_tiny_components()
    ours_parts = build_tiny_components()
    assert len(full["text_encoder"].model.layers) == 36
    encoder = PromptEncoder(ours_parts["text_encoder"], ours_parts["tokenizer"], model_id="t",
                            device="cpu", dtype=torch.float32)
    assert encoder.num_layers_run == 27
    for text in ["a red fox in fresh snow", "", "Ünïcode prompt ✓ with <angle> brackets"]:
        with torch.inference_mode():
            reference = Flux2KleinPipeline._get_qwen3_prompt_embeds(
                text_encoder=full["text_encoder"], tokenizer=full["tokenizer"], prompt=text)
        ours, hit = encoder.encode(text)
        assert not hit
        assert ours.shape == (1, 512, 96)
        assert torch.equal(ours, reference), text


def test_embedding_cache_skips_the_encoder(tiny_engine):
    prompt = "a prompt used only by the cache test"
    calls = tiny_engine.text.encoder_calls
    first = tiny_engine.generate(req(prompt=prompt, guidance_scale=3.0))
    after_first = tiny_engine.text.encoder_calls
    assert 1 <= after_first - calls <= 2  # the prompt (and the "" negative unless already cached)
    second = tiny_engine.generate(req(prompt=prompt, guidance_scale=3.0))
    assert tiny_engine.text.encoder_calls == after_first
    assert "embedding_cache" in second.techniques
    assert any("from the embedding cache" in line for line in second.logs)
    assert np.array_equal(pixels(first.images[0]), pixels(second.images[0]))


# ----------------------------------------------------------------------------------- model specs


def test_tiny_engine_is_announced(tiny_engine, caplog):
    assert tiny_engine.info.is_tiny and tiny_engine.info.source == "tiny"
    assert tiny_engine.info.device == "cpu" and tiny_engine.info.dtype == "float32"
    with caplog.at_level("WARNING", logger="kleinserve.engine"):
        models.load_components("tiny")
    assert any("NOT FLUX.2" in r.getMessage() for r in caplog.records)


def test_auto_spec(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_spec("auto") == "tiny"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.resolve_spec("auto") == models.DEFAULT_REPO_ID
    assert models.resolve_spec("some/repo") == "some/repo"


def test_dtype_defaults_and_overrides():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert models.resolve_dtype(None, cpu) == torch.float32
    assert models.resolve_dtype(None, cuda) == torch.bfloat16
    assert models.resolve_dtype("fp16", cuda) == torch.float16
    assert models.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError):
        models.resolve_dtype("int3", cpu)


def test_load_from_a_diffusers_folder(tiny_engine, tiny_model_dir):
    engine = load_engine(str(tiny_model_dir), device="cpu")
    assert engine.info.source == str(tiny_model_dir.resolve())
    assert engine.info.is_tiny  # the saved tiny model stays announced
    assert engine.text.num_layers_run == 27
    request = req(guidance_scale=3.0)
    assert torch.equal(engine.sample_latents(request), tiny_engine.sample_latents(request))


def test_missing_folder_is_a_helpful_error(tmp_path):
    with pytest.raises(ModelUnavailable, match="does not exist"):
        load_engine(str(tmp_path / "no" / "such" / "model"))


def test_folder_missing_a_component(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(ModelUnavailable, match=r"has no vae/ subfolder.*diffusers-layout"):
        load_engine(str(broken))


def test_folder_with_a_corrupt_component(tmp_path, tiny_model_dir):
    broken = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelUnavailable, match="cannot load transformer/"):
        load_engine(str(broken))


def test_offline_repo_id_is_a_helpful_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE.*hf download"):
        load_engine("kleinserve-tests/no-such-model")


def test_text_encoder_shard_selection():
    index = {"weight_map": {
        "model.embed_tokens.weight": "a.safetensors",
        "model.layers.0.mlp.up_proj.weight": "a.safetensors",
        "model.layers.26.mlp.up_proj.weight": "b.safetensors",
        "model.layers.27.mlp.up_proj.weight": "c.safetensors",
        "model.layers.35.mlp.up_proj.weight": "d.safetensors",
        "model.norm.weight": "d.safetensors",
        "lm_head.weight": "e.safetensors",
    }}
    assert models.needed_text_encoder_shards(index) == {"a.safetensors", "b.safetensors", "d.safetensors"}


def test_offloaded_text_encoder_stays_on_cpu_and_encodes_the_same(tiny_engine):
    from kleinserve.engine.text import PromptEncoder
    from kleinserve.engine.tiny import build_tiny_components

    parts = build_tiny_components()
    encoder = PromptEncoder(parts["text_encoder"], parts["tokenizer"], model_id="offload", device="cpu",
                            dtype=torch.float32, offload=True)
    emb, hit = encoder.encode("a red fox in fresh snow")
    assert not hit and next(encoder.model.parameters()).device.type == "cpu"
    reference, _ = tiny_engine.text.encode("a red fox in fresh snow")
    assert torch.equal(emb, reference)


def test_set_cns_matrix(tiny_engine):
    from kleinserve.engine.cns import GammaMatrix

    matrix = GammaMatrix(values=[[0.0, 0.1], [0.5, 0.6], [1.0, 1.0]], sigmas=[1.0, 0.5, 0.0], name="mine")
    assert tiny_engine.cns_matrix is None
    tiny_engine.set_cns_matrix(matrix)
    try:
        logs = tiny_engine.generate(req(enable_cns=True, cns_gamma_source="matrix")).logs
        assert any("mine" in line and "calibrated" in line for line in logs)
    finally:
        tiny_engine.set_cns_matrix(None)


def test_unpack_latents_matches_the_decode_path(tiny_engine):
    request = req()
    h8, w8, channels = tiny_engine.latent_grid(request)
    packed = tiny_engine.sample_latents(request)
    grid = tiny_engine.unpack_latents(packed, h8, w8)
    assert grid.shape == (1, channels, h8, w8)
    patched = tiny_engine._unpack_patched(packed, h8 // 2, w8 // 2)  # what decode uses (diffusers' ids)
    from diffusers import Flux2KleinPipeline

    assert torch.equal(grid, Flux2KleinPipeline._unpatchify_latents(patched))


def test_previews_only_while_someone_wants_them(tiny_engine):
    """`wants_preview` is asked at each preview step: previews stop and start with the audience."""
    events, audience = [], {"on": False}

    def on_step(ev):
        events.append(ev)
        audience["on"] = ev.step >= 3  # someone starts following after step 3

    tiny_engine.generate(req(num_inference_steps=6), on_step=on_step, preview_every=1,
                         wants_preview=lambda: audience["on"])
    assert [e.step for e in events if e.preview is not None] == [4, 5, 6]
