"""Image encoding with the generation recipe stored in the file, previews and data URIs.

Every encoded image carries its own recipe (the generation parameters) so it can be reproduced:

* PNG: text chunks `kleinserve` (the recipe as JSON) and `parameters` (a human-readable summary in
  the style other image tools read: prompt, then "Negative prompt: ...", then "Key: value, ...").
* JPEG / WebP: EXIF ImageDescription (0x010E) holds the recipe as (ASCII-escaped) JSON and EXIF
  Software (0x0131) says "kleinserve <version>".

`read_recipe(data)` reads it back from any of the three formats.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping
from typing import Any, Optional

from PIL import Image, PngImagePlugin

from .. import __version__

RECIPE_KEY = "kleinserve"  # PNG text chunk holding the JSON recipe
PARAMETERS_KEY = "parameters"  # PNG text chunk holding the human-readable summary
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_SOFTWARE = 0x0131
SOFTWARE = f"kleinserve {__version__}"

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_ALIASES = {"jpg": "jpeg", "image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}

DEFAULT_QUALITY = {"jpeg": 95, "webp": 95}
# The recipe embedded in an image is bounded (longer prompts are cut, with "truncated": true): a
# request cannot turn a 64x64 image into megabytes of metadata. (A JPEG APP1 segment holds at most
# 65533 bytes anyway.)
MAX_RECIPE_CHARS = 16_000
_TRUNCATABLE = ("prompt", "negative_prompt")


def normalize_format(fmt: str) -> str:
    """'png' | 'jpeg' | 'webp' (also accepts 'jpg' and the content types); ValueError otherwise."""
    key = str(fmt).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in CONTENT_TYPES:
        raise ValueError(f"unsupported image format {fmt!r}; expected one of png, jpeg, webp")
    return key


def _recipe_json(recipe: Mapping[str, Any]) -> str:
    # ensure_ascii: EXIF ASCII fields cannot hold anything else; JSON escapes keep it lossless.
    return json.dumps(dict(recipe), ensure_ascii=True, separators=(",", ":"), default=str)


def _fit_recipe_json(recipe: Mapping[str, Any], limit: int) -> str:
    """The recipe JSON, with the longest prompt fields cut (and `truncated: true`) if over `limit`."""
    text = _recipe_json(recipe)
    if len(text) <= limit:
        return text
    shortened = dict(recipe)
    shortened["truncated"] = True
    for _ in range(64):
        text = _recipe_json(shortened)
        excess = len(text) - limit
        if excess <= 0:
            return text
        candidates = [k for k in _TRUNCATABLE if isinstance(shortened.get(k), str) and shortened[k]]
        if not candidates:
            break
        key = max(candidates, key=lambda k: len(_recipe_json({k: shortened[k]})))
        value = shortened[key]
        # JSON escapes make a character cost 1..12 bytes: cut by the average cost, then loop.
        per_char = max(1.0, (len(_recipe_json({key: value})) - len(key) - 6) / len(value))
        shortened[key] = value[: max(0, len(value) - int(excess / per_char) - 8)]
    return _recipe_json({"truncated": True, "note": "recipe too large for this format"})


def format_parameters(recipe: Mapping[str, Any]) -> str:
    """Human-readable summary: the prompt, a 'Negative prompt:' line, then 'Key: value, ...'."""
    lines = [str(recipe.get("prompt", ""))]
    negative = recipe.get("negative_prompt")
    if negative:
        lines.append(f"Negative prompt: {negative}")
    parts = []
    for key, value in recipe.items():
        if key in ("prompt", "negative_prompt"):
            continue
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        label = str(key).replace("_", " ")
        label = label[:1].upper() + label[1:]
        parts.append(f"{label}: {value}")
    if parts:
        lines.append(", ".join(parts))
    return "\n".join(lines)


def _prepare(image: Image.Image, fmt: str) -> Image.Image:
    if fmt == "jpeg":
        return image if image.mode in ("RGB", "L") else image.convert("RGB")
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        return image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return image


def encode_image(
    image: Image.Image,
    fmt: str,
    recipe: Optional[Mapping[str, Any]] = None,
    *,
    quality: Optional[int] = None,
) -> tuple[bytes, str]:
    """Encode `image` as png / jpeg / webp with `recipe` stored in its metadata.

    Returns (bytes, content_type). `quality` applies to jpeg and webp (default 95).
    """
    fmt = normalize_format(fmt)
    recipe = dict(recipe or {})
    img = _prepare(image, fmt)
    buf = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if recipe:
            text = _fit_recipe_json(recipe, MAX_RECIPE_CHARS)
            info.add_text(RECIPE_KEY, text)
            info.add_text(PARAMETERS_KEY, format_parameters(json.loads(text)))  # iTXt when not latin-1
        info.add_text("Software", SOFTWARE)
        img.save(buf, "PNG", pnginfo=info, compress_level=6)
    else:
        exif = Image.Exif()
        exif[EXIF_SOFTWARE] = SOFTWARE
        if recipe:
            exif[EXIF_IMAGE_DESCRIPTION] = _fit_recipe_json(recipe, MAX_RECIPE_CHARS)
        q = DEFAULT_QUALITY[fmt] if quality is None else int(quality)
        kwargs: dict[str, Any] = {"exif": exif.tobytes(), "quality": q}
        if fmt == "jpeg":
            kwargs["optimize"] = False
        else:
            kwargs["method"] = 4
        img.save(buf, _PIL_FORMATS[fmt], **kwargs)
    return buf.getvalue(), CONTENT_TYPES[fmt]


def _parse_recipe(text: Any) -> Optional[dict]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not isinstance(text, str) or not text:
        return None
    try:
        value = json.loads(text.rstrip("\x00"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_recipe(data: bytes) -> Optional[dict]:
    """The recipe stored by `encode_image` in PNG / JPEG / WebP bytes; None when absent or unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "PNG":
                text = getattr(img, "text", None) or img.info
                return _parse_recipe(text.get(RECIPE_KEY))
            return _parse_recipe(img.getexif().get(EXIF_IMAGE_DESCRIPTION))
    except Exception:  # noqa: BLE001 - not an image, truncated, unsupported: no recipe
        return None


def make_preview(image: Image.Image, max_side: int = 256) -> Image.Image:
    """An RGB copy downscaled so that its longer side is <= max_side (aspect kept; never upscaled)."""
    if max_side < 1:
        raise ValueError("max_side must be >= 1")
    img = image if image.mode == "RGB" else image.convert("RGB")
    w, h = img.size
    scale = max_side / max(w, h)
    if scale >= 1.0:
        return img.copy()
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def data_uri(data: bytes, content_type: str) -> str:
    """`data:<content_type>;base64,<...>`."""
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def preview_data_uri(
    image: Image.Image, fmt: str = "jpeg", quality: int = 70, *, max_side: Optional[int] = None
) -> str:
    """A small data URI for a (preview) image, without metadata; downscaled first when max_side is given."""
    fmt = normalize_format(fmt)
    img = make_preview(image, max_side) if max_side else image
    img = _prepare(img, fmt)
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=1)
    else:
        img.save(buf, _PIL_FORMATS[fmt], quality=int(quality))
    return data_uri(buf.getvalue(), CONTENT_TYPES[fmt])


__all__ = [
    "CONTENT_TYPES",
    "PARAMETERS_KEY",
    "RECIPE_KEY",
    "data_uri",
    "encode_image",
    "format_parameters",
    "make_preview",
    "normalize_format",
    "preview_data_uri",
    "read_recipe",
]
