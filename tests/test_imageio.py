"""png / jpeg / webp encoding with the recipe in the file, previews, data URIs."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from kleinserve.engine.imageio import (
    CONTENT_TYPES,
    data_uri,
    encode_image,
    format_parameters,
    make_preview,
    normalize_format,
    preview_data_uri,
    read_recipe,
)

RECIPE = {
    "endpoint": "fal-ai/flux-2/klein/9b/base",
    "prompt": "a caf\u00e9 at night, neon \u2615 \"quoted\"\nsecond line",
    "negative_prompt": "blurry",
    "seed": 1234567890123,
    "num_inference_steps": 28,
    "guidance_scale": 5.0,
    "image_size": {"width": 80, "height": 48},
    "enable_cns": True,
    "model": "tiny",
}


def _image(w: int = 80, h: int = 48) -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_recipe_round_trips(fmt):
    data, content_type = encode_image(_image(), fmt, RECIPE)
    assert content_type == CONTENT_TYPES[fmt] == f"image/{fmt}"
    assert read_recipe(data) == RECIPE
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
        assert im.size == (80, 48)


def test_png_text_chunks():
    data, _ = encode_image(_image(), "png", RECIPE)
    with Image.open(io.BytesIO(data)) as im:
        text = im.text
    assert "kleinserve" in text and "parameters" in text
    params = text["parameters"]
    assert params.startswith(RECIPE["prompt"])
    assert "Negative prompt: blurry" in params
    assert "Seed: 1234567890123" in params
    assert params == format_parameters(RECIPE)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_exif_image_description_holds_json(fmt):
    data, _ = encode_image(_image(), fmt, RECIPE)
    with Image.open(io.BytesIO(data)) as im:
        desc = im.getexif().get(0x010E)
        software = im.getexif().get(0x0131)
    assert isinstance(desc, str) and desc.startswith("{")
    assert desc.isascii()  # EXIF ASCII: non-ASCII is JSON-escaped, losslessly
    assert software.startswith("kleinserve")


def test_png_pixels_are_lossless():
    img = _image()
    data, _ = encode_image(img, "png", RECIPE)
    with Image.open(io.BytesIO(data)) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(img))


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("size", [(64, 64), (1, 1), (333, 17)])
def test_sizes_preserved(fmt, size):
    data, _ = encode_image(_image(*size), fmt, {"seed": 1})
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == size


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_modes_are_converted(fmt):
    for mode in ("RGBA", "L", "P"):
        data, _ = encode_image(_image().convert(mode), fmt, {"seed": 1})
        assert read_recipe(data) == {"seed": 1}


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_without_recipe(fmt):
    data, content_type = encode_image(_image(), fmt, None)
    assert content_type == f"image/{fmt}"
    assert read_recipe(data) is None
    data, _ = encode_image(_image(), fmt, {})
    assert read_recipe(data) is None


def test_format_aliases_and_errors():
    assert normalize_format("JPG") == "jpeg"
    assert normalize_format("image/webp") == "webp"
    data, content_type = encode_image(_image(), "jpg", {"a": 1})
    assert content_type == "image/jpeg"
    with pytest.raises(ValueError):
        encode_image(_image(), "gif", {})


def test_jpeg_quality_changes_size():
    small, _ = encode_image(_image(256, 256), "jpeg", {}, quality=30)
    large, _ = encode_image(_image(256, 256), "jpeg", {}, quality=95)
    assert len(small) < len(large)


def test_huge_prompt_in_jpeg_is_truncated_not_failing():
    recipe = {"prompt": "\u00e9t\u00e9 " * 40000, "seed": 3}
    data, _ = encode_image(_image(), "jpeg", recipe)
    back = read_recipe(data)
    assert back["seed"] == 3 and back["truncated"] is True
    assert recipe["prompt"].startswith(back["prompt"]) and len(back["prompt"]) > 1000
    # PNG and WebP are bounded the same way (issue 10: a request must not inflate its images).
    for fmt in ("png", "webp"):
        data, _ = encode_image(_image(), fmt, recipe)
        back = read_recipe(data)
        assert back["seed"] == 3 and back["truncated"] is True and recipe["prompt"].startswith(back["prompt"])
    small = {"prompt": "\u00e9t\u00e9 " * 100, "seed": 3}
    for fmt in ("png", "jpeg", "webp"):  # a recipe within the bound round-trips unchanged
        assert read_recipe(encode_image(_image(), fmt, small)[0]) == small


def test_read_recipe_on_garbage():
    assert read_recipe(b"") is None
    assert read_recipe(b"not an image") is None
    buf = io.BytesIO()
    _image().save(buf, "PNG")  # a PNG without our chunk
    assert read_recipe(buf.getvalue()) is None


@pytest.mark.parametrize("size,max_side,expected", [
    ((1024, 768), 256, (256, 192)),
    ((768, 1024), 256, (192, 256)),
    ((1024, 576), 256, (256, 144)),
    ((100, 60), 256, (100, 60)),  # never upscaled
    ((2048, 16), 256, (256, 2)),
    ((4000, 1), 100, (100, 1)),
])
def test_make_preview_bounded_and_keeps_aspect(size, max_side, expected):
    img = Image.new("RGB", size, (1, 2, 3))
    prev = make_preview(img, max_side=max_side)
    assert prev.size == expected
    assert max(prev.size) <= max_side
    assert prev.mode == "RGB"
    assert prev is not img


def test_make_preview_default_and_rgba():
    prev = make_preview(Image.new("RGBA", (1200, 900)))
    assert prev.size == (256, 192) and prev.mode == "RGB"


def test_data_uris():
    uri = data_uri(b"\x00\x01abc", "image/png")
    assert uri == "data:image/png;base64," + base64.b64encode(b"\x00\x01abc").decode()
    p = preview_data_uri(_image(), "jpeg", 70)
    assert p.startswith("data:image/jpeg;base64,")
    raw = base64.b64decode(p.split(",", 1)[1])
    with Image.open(io.BytesIO(raw)) as im:
        assert im.format == "JPEG" and im.size == (80, 48)
    assert read_recipe(raw) is None  # previews carry no metadata
    for fmt in ("png", "webp"):
        assert preview_data_uri(_image(), fmt).startswith(f"data:image/{fmt};base64,")
    small = preview_data_uri(Image.new("RGB", (1024, 512)), max_side=128)
    with Image.open(io.BytesIO(base64.b64decode(small.split(",", 1)[1]))) as im:
        assert im.size == (128, 64)
