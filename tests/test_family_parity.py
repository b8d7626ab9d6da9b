"""The klein family against diffusers: editing with reference images and LoRA adapters.

Same components (the tiny model saved in diffusers layout), float32 on CPU, negative_prompt="", CNS off,
same seed: our engine's images match `Flux2KleinPipeline(image=[...])` and `load_lora_weights` +
pipeline within 2/255 -- the float images and the 8-bit images we encode. The reference images reach the
engine the way a request's do: as data: URIs decoded by service.inputs.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from kleinserve.engine.tiny import save_tiny_lora
from kleinserve.engine.types import LoraFile, LoraFormatError
from kleinserve.schema import FluxKleinEditInput, FluxKleinEditLoraInput, FluxKleinLoraInput
from kleinserve.service.inputs import InputSources, resolve_images

TOLERANCE = 2 / 255
PROMPT = "turn the fox into a watercolor painting"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from diffusers import Flux2KleinPipeline

    p = Flux2KleinPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def png_data_uri(seed: int, width: int, height: int) -> str:
    rng = np.random.default_rng(seed)
    # smooth-ish content (a gradient plus noise), so resampling matters
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    arr = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


URIS = [png_data_uri(1, 101, 75), png_data_uri(2, 130, 64), png_data_uri(3, 80, 96)]


def decoded(uris):
    return resolve_images(uris, InputSources())


def pixels(encoded) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded.data)).convert("RGB")).astype(np.int16)


def edit_request(n: int, guidance: float, **kw) -> FluxKleinEditInput:
    base = dict(prompt=PROMPT, negative_prompt="", guidance_scale=guidance, num_inference_steps=4, seed=21,
                image_urls=URIS[:n], enable_safety_checker=False, enable_cns=False, output_format="png")
    base.update(kw)
    return FluxKleinEditInput(**base)


# --------------------------------------------------------------------------------------------- editing

@pytest.mark.parametrize("n,guidance", [(1, 4.0), (2, 4.0), (3, 1.0)])
def test_edit_matches_the_diffusers_pipeline(tiny_engine, pipe, n, guidance):
    images = decoded(URIS[:n])
    request = edit_request(n, guidance)
    reference = pipe(prompt=PROMPT, image=images, num_inference_steps=4, guidance_scale=guidance,
                     generator=torch.Generator("cpu").manual_seed(21), output_type="np").images
    # no image_size: the first reference's size, floored to multiples of 16 (101x75 -> 96x64)
    assert reference.shape == (1, 64, 96, 3)

    packed = tiny_engine.sample_latents(request, reference_images=images)
    width, height = tiny_engine.output_size(request, images)
    assert (width, height) == (96, 64)
    h8, w8 = tiny_engine.latent_hw(width, height)
    ours = tiny_engine._decode_float(packed, h8 // 2, w8 // 2)
    assert np.abs(ours - reference).max() <= TOLERANCE

    result = tiny_engine.generate(request, reference_images=images)
    assert (result.images[0].width, result.images[0].height) == (96, 64)
    assert np.abs(pixels(result.images[0]) - (reference[0] * 255).round().astype(np.int16)).max() <= 2
    assert any(f"{n} reference image(s)" in line for line in result.logs)


def test_edit_parity_is_not_vacuous(tiny_engine):
    """Each reference image changes the result by several times the parity tolerance (2/255)."""
    one = tiny_engine.generate(edit_request(1, 4.0), reference_images=decoded(URIS[:1]))
    two = tiny_engine.generate(edit_request(2, 4.0), reference_images=decoded(URIS[:2]))
    other = tiny_engine.generate(edit_request(1, 4.0, image_urls=URIS[1:2], image_size={"width": 96, "height": 64}),
                                 reference_images=decoded(URIS[1:2]))
    assert np.abs(pixels(one.images[0]) - pixels(two.images[0])).max() > 10
    assert np.abs(pixels(one.images[0]) - pixels(other.images[0])).max() > 10
    # the second image alone: its own size (130x64 -> 128x64)
    alone = tiny_engine.generate(edit_request(1, 4.0, image_urls=URIS[1:2]), reference_images=decoded(URIS[1:2]))
    assert (alone.images[0].width, alone.images[0].height) == (128, 64)


def test_explicit_size_and_large_reference_downscaled(tiny_engine, pipe):
    """image_size wins over the reference's size; a reference over 1 MP is downscaled as diffusers does."""
    big = png_data_uri(4, 1200, 1000)
    images = decoded([big])
    request = edit_request(1, 1.0, image_urls=[big], image_size={"width": 64, "height": 64})
    reference = pipe(prompt=PROMPT, image=images, height=64, width=64, num_inference_steps=4, guidance_scale=1.0,
                     generator=torch.Generator("cpu").manual_seed(21), output_type="np").images
    result = tiny_engine.generate(request, reference_images=images)
    assert (result.images[0].width, result.images[0].height) == (64, 64)
    assert np.abs(pixels(result.images[0]) - (reference[0] * 255).round().astype(np.int16)).max() <= 2
    assert any("1120x928" in line for line in result.logs)  # 1200x1000 -> ~1 MP, floored to 16


def test_edits_run_alone_and_metadata_omits_data_uris(tiny_engine):
    request = edit_request(1, 1.0)
    assert tiny_engine.batch_key(request) is None
    result = tiny_engine.generate(request, reference_images=decoded(URIS[:1]))
    text = Image.open(io.BytesIO(result.images[0].data)).info
    assert "base64" not in str(text)


# --------------------------------------------------------------------------------------------- LoRA

@pytest.fixture(scope="module")
def lora_engine():
    """Its own tiny engine: adapters loaded into it stay (disabled) in its transformer."""
    from kleinserve.engine import load_engine

    return load_engine("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {layout: save_tiny_lora(d / f"{layout}.safetensors", layout=layout, seed=seed)
            for layout, seed in (("diffusers", 1), ("kohya", 3), ("bfl", 5), ("lokr", 7))}


LORA_KW = dict(prompt="a red fox in fresh snow", negative_prompt="", guidance_scale=3.0, num_inference_steps=4,
               seed=5, image_size={"width": 64, "height": 64}, enable_safety_checker=False, output_format="png")


def lora_request(loras=(), **kw) -> FluxKleinLoraInput:
    return FluxKleinLoraInput(**{**LORA_KW, **kw}, loras=[{"path": str(f.file), "scale": f.scale} for f in loras])


def pipe_image(pipe, lora=None, scale=1.0):
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="parity")
        pipe.set_adapters(["parity"], [scale])
    try:
        return pipe(prompt=LORA_KW["prompt"], height=64, width=64, num_inference_steps=4, guidance_scale=3.0,
                    generator=torch.Generator("cpu").manual_seed(5), output_type="np").images
    finally:
        if lora is not None:
            pipe.unload_lora_weights()


@pytest.mark.parametrize("layout,scale", [("diffusers", 1.0), ("diffusers", 0.6), ("kohya", 1.0), ("kohya", 0.7),
                                          ("bfl", 0.9), ("lokr", 1.0)])
def test_lora_matches_load_lora_weights(lora_engine, pipe, lora_files, layout, scale):
    loras = [LoraFile(lora_files[layout], scale, f"{layout}.safetensors")]
    reference = pipe_image(pipe, lora_files[layout], scale)
    base = pipe_image(pipe)
    assert np.abs(reference - base).max() > 10 * TOLERANCE  # the LoRA matters

    request = lora_request(loras)
    result = lora_engine.generate(request, loras=loras)
    assert np.abs(pixels(result.images[0]) - (reference[0] * 255).round().astype(np.int16)).max() <= 2
    assert "lora" in result.techniques
    assert any(f"LoRA {layout}.safetensors (scale {scale:g})" in line for line in result.logs)


def test_base_request_after_a_lora_request_is_exactly_the_base_image(lora_engine, lora_files):
    before = lora_engine.generate(lora_request())
    loras = [LoraFile(lora_files["diffusers"], 0.9, "a"), LoraFile(lora_files["kohya"], 0.5, "b")]
    with_lora = lora_engine.generate(lora_request(loras), loras=loras)
    after = lora_engine.generate(lora_request())
    assert np.abs(pixels(before.images[0]) - pixels(with_lora.images[0])).max() > 20
    assert np.array_equal(pixels(before.images[0]), pixels(after.images[0]))
    assert "lora" not in after.techniques
    # and the same LoRA set again gives its image again (adapter kept in memory, scales re-set)
    again = lora_engine.generate(lora_request(loras), loras=loras)
    assert np.array_equal(pixels(with_lora.images[0]), pixels(again.images[0]))
    assert any("already in memory" in line for line in again.logs)


def test_lora_sets_never_share_a_batch(lora_engine, lora_files):
    a = [LoraFile(lora_files["diffusers"], 1.0, "a")]
    assert lora_engine.batch_key(lora_request()) != lora_engine.batch_key(lora_request(a))
    assert lora_engine.batch_key(lora_request(a)) != lora_engine.batch_key(
        lora_request([LoraFile(lora_files["diffusers"], 0.5, "a")]))
    assert lora_engine.batch_key(lora_request(a)) == lora_engine.batch_key(lora_request(a, seed=9))


def test_lora_at_every_acceleration_level(lora_engine, lora_files):
    loras = [LoraFile(lora_files["diffusers"], 1.0, "a")]
    ref = pixels(lora_engine.generate(lora_request(loras, acceleration="none"), loras=loras).images[0])
    regular = pixels(lora_engine.generate(lora_request(loras, acceleration="regular"), loras=loras).images[0])
    assert np.abs(ref - regular).max() <= 2
    high = lora_engine.generate(lora_request(loras, acceleration="high"), loras=loras)
    base_high = lora_engine.generate(lora_request(acceleration="high"))
    assert "fp8_rowwise:skipped(lora)" in high.techniques
    assert np.abs(pixels(high.images[0]) - pixels(base_high.images[0])).max() > 20  # the LoRA ran
    # the base at `high` (its own module tree) carries no adapter
    base_none = pixels(lora_engine.generate(lora_request(acceleration="none")).images[0])
    assert np.abs(pixels(base_high.images[0]) - base_none).max() < np.abs(ref - base_none).max()


def test_edit_with_lora(lora_engine, pipe, lora_files):
    images = decoded(URIS[:1])
    loras = [LoraFile(lora_files["kohya"], 0.8, "k")]
    request = FluxKleinEditLoraInput(prompt=PROMPT, negative_prompt="", guidance_scale=2.0, num_inference_steps=4,
                                     seed=3, image_urls=URIS[:1], enable_safety_checker=False,
                                     loras=[{"path": str(lora_files["kohya"]), "scale": 0.8}])
    pipe.load_lora_weights(str(lora_files["kohya"]), adapter_name="parity")
    pipe.set_adapters(["parity"], [0.8])
    try:
        reference = pipe(prompt=PROMPT, image=images, num_inference_steps=4, guidance_scale=2.0,
                         generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    finally:
        pipe.unload_lora_weights()
    result = lora_engine.generate(request, reference_images=images, loras=loras)
    assert np.abs(pixels(result.images[0]) - (reference[0] * 255).round().astype(np.int16)).max() <= 2


def test_files_that_are_not_loras_are_named_errors(lora_engine, tmp_path):
    from safetensors.torch import save_file

    not_lora = tmp_path / "model.safetensors"
    save_file({"transformer.x_embedder.weight": torch.zeros(2, 2)}, str(not_lora))
    other_model = tmp_path / "sdxl.safetensors"
    save_file({"unet.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "unet.down_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)}, str(other_model))
    wrong_shape = tmp_path / "big.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)}, str(wrong_shape))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    cases = {not_lora: "not a LoRA", other_model: "no keys for the FLUX.2 transformer",
             wrong_shape: "does not fit this model", garbage: "not a LoRA file"}
    for path, expected in cases.items():
        loras = [LoraFile(path, 1.0, path.name)]
        with pytest.raises(LoraFormatError, match=expected) as info:
            lora_engine.generate(lora_request(loras), loras=loras)
        assert path.name in str(info.value)
    # and nothing of them stays behind: the base image is unchanged
    assert lora_engine.generate(lora_request()).images[0].data == lora_engine.generate(lora_request()).images[0].data


def test_adapters_live_in_a_weight_sharing_tree(lora_engine, lora_files):
    """The reference transformer never gets a PEFT layer; the adapter tree shares its weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    loras = [LoraFile(lora_files["diffusers"], 1.0, "a")]
    lora_engine.generate(lora_request(loras), loras=loras)
    assert not any(isinstance(m, BaseTunerLayer) for m in lora_engine.transformer.modules())
    tree = lora_engine.accelerator.adapter_model()
    assert any(isinstance(m, BaseTunerLayer) for m in tree.modules())
    ref = dict(lora_engine.transformer.named_parameters())
    shared = [n for n, p in tree.named_parameters() if "lora_" not in n]
    assert shared and all(p.data_ptr() == ref[n.replace(".base_layer", "")].data_ptr()
                          for n, p in tree.named_parameters() if "lora_" not in n)
