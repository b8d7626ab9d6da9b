"""The endpoint's input and output schema: the one source of truth.

Validation (API and CLI), the OpenAPI document, the CLI flags and the playground form are all
generated from these models, so a field added here shows up everywhere.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import UnionType
from typing import Any, Literal, Optional, Union, cast, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

ENDPOINT_ID = "fal-ai/flux-2/klein/9b/base"
EDIT_ENDPOINT_ID = ENDPOINT_ID + "/edit"
LORA_ENDPOINT_ID = ENDPOINT_ID + "/lora"
EDIT_LORA_ENDPOINT_ID = ENDPOINT_ID + "/edit/lora"

MAX_REFERENCE_IMAGES = 4
MAX_LORAS = 3

# (width, height) of each preset, as the hosted endpoint defines them.
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

ImageSizePreset = Literal[
    "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]

SIZE_MULTIPLE = 16  # VAE /8 then 2x2 patchify

# Longest prompt / negative prompt accepted (characters). The text encoder reads at most 512 tokens
# (about 2,000 characters of English) anyway; the cap keeps a request from filling the database
# and every image's metadata with megabytes of text.
MAX_PROMPT_CHARS = 8000


def _scalar_type(annotation: Any) -> Any:
    """int / float / bool behind an annotation (`int | None` -> int); None for anything else."""
    if annotation in (int, float, bool):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        found = {a for a in get_args(annotation) if a in (int, float, bool)}
        others = [a for a in get_args(annotation) if a not in (int, float, bool, type(None))]
        if len(found) == 1 and not others:
            return found.pop()
    return None


class StrictScalars(BaseModel):
    """JSON `true` where a number is expected, or a number where true/false is expected, is a 422
    naming the field (pydantic's lax mode would read `"seed": true` as seed 1)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_number_mixups(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        kind = _scalar_type(field.annotation) if field is not None else None
        if kind in (int, float) and isinstance(value, bool):
            raise PydanticCustomError("number_type", "Input should be a number, not true/false")
        if kind is bool and isinstance(value, (int, float)) and not isinstance(value, bool):
            raise PydanticCustomError("bool_type", "Input should be true or false, not a number")
        return value


class ImageSize(StrictScalars):
    model_config = ConfigDict(extra="forbid")

    width: int = Field(512, ge=64, le=2048, description="Width in pixels; rounded to a multiple of 16.")
    height: int = Field(512, ge=64, le=2048, description="Height in pixels; rounded to a multiple of 16.")


def round_to_multiple(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    """Nearest multiple (ties round up), never below one multiple."""
    return max(multiple, int((value + multiple // 2) // multiple) * multiple)


class FluxKleinInput(StrictScalars):
    """Input of `fal-ai/flux-2/klein/9b/base`."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS,
                        description="The prompt to generate an image from (at most 8000 characters; the "
                                    "text encoder reads its first 512 tokens).",
                        json_schema_extra={"ui": "textarea"})
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS,
                                 description="What the image should not contain (true CFG; at most 8000 "
                                             "characters).",
                                 json_schema_extra={"ui": "textarea"})
    guidance_scale: float = Field(5.0, ge=0.0, le=20.0,
                                  description="Classifier-free guidance scale; CFG runs when > 1.")
    num_inference_steps: int = Field(28, ge=4, le=50, description="Number of denoising steps.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="Seed; random when absent. Image k uses seed + k.")
    image_size: Union[ImageSizePreset, ImageSize] = Field(
        "landscape_4_3", description="A preset name or {width, height} (64..2048, rounded to 16).")
    num_images: int = Field(1, ge=1, le=4, description="Number of images to generate.")
    acceleration: Literal["none", "regular", "high"] = Field(
        "regular", description="none: eager reference; regular: lossless speedups; high: FP8 + block cache.")
    sync_mode: bool = Field(False, description="Return images as data URIs and store nothing.")
    enable_safety_checker: bool = Field(True, description="Replace NSFW images by black ones.")
    output_format: Literal["jpeg", "png", "webp"] = Field("png", description="Image file format.")

    enable_cns: bool = Field(False, description="Colored Noise Sampling: a stochastic sampler whose "
                             "injected noise is shaped toward still-unresolved frequency bands.")
    cns_s_churn: float = Field(0.5, ge=0.0, le=10.0, description="Stochasticity: 0 is plain Euler, 1 "
                               "matches the paper's SDE noise level, larger is clamped at ancestral.")
    cns_gamma_source: Literal["matrix", "approximation"] = Field(
        "matrix", description="Per-band progress: a calibrated/bundled matrix, or 1 - sigma for all bands.")
    cns_power_gamma: float = Field(0.75, ge=0.0, le=4.0, description="Exponent on the per-band amplitudes.")
    cns_gamma_divider: float = Field(1.73, gt=0.0, le=100.0,
                                     description="Residual = 1 - gamma / divider per band.")
    cns_alpha_tilt_start: float = Field(0.15, ge=-5.0, le=5.0, description="Spectral tilt at the first step.")
    cns_alpha_tilt_end: float = Field(-0.5, ge=-5.0, le=5.0, description="Spectral tilt at the last step.")
    cns_alpha_use_fnorm: bool = Field(True, description="Tilt by exp(alpha * normalised frequency) "
                                      "(false: a flat (1 + alpha) multiplier, shape-neutral).")
    cns_alpha_exp_interp: bool = Field(True, description="Interpolate the tilt exponentially over steps.")
    cns_alpha_exp_sharpness: float = Field(0.75, ge=0.0, le=10.0,
                                           description="Sharpness k of the exponential tilt schedule.")
    cns_num_freq_bins: int = Field(32, ge=8, le=128, description="Number of radial frequency bins.")
    cns_energy_scale: float = Field(0.98, ge=0.0, le=2.0,
                                    description="Scale of the injected noise after normalisation.")

    def resolved_size(self) -> tuple[int, int]:
        """(width, height) actually generated: preset, or the custom size rounded to a multiple of 16."""
        if isinstance(self.image_size, str):
            return IMAGE_SIZE_PRESETS[self.image_size]
        return round_to_multiple(self.image_size.width), round_to_multiple(self.image_size.height)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0


IMAGE_URL_SCHEMES = ("https://", "http://", "data:")


class FluxKleinEditInput(FluxKleinInput):
    """Input of `.../edit`: the base input plus 1..4 reference images. Without `image_size` the output
    takes the first reference image's size (after its preprocessing: multiples of 16, <= 1 MP)."""

    image_urls: list[str] = Field(
        ..., min_length=1, max_length=MAX_REFERENCE_IMAGES,
        description="The URLs of the images for editing (1..4): https URLs, data: URIs or URLs of "
                    "files uploaded to this server.", json_schema_extra={"ui": "images"})
    image_size: Optional[Union[ImageSizePreset, ImageSize]] = Field(  # type: ignore[assignment]
        None, description="A preset name or {width, height}; absent: the first input image's size.")

    @field_validator("image_urls")
    @classmethod
    def _url_schemes(cls, urls: list[str]) -> list[str]:
        for k, url in enumerate(urls):
            if not url.strip().lower().startswith(IMAGE_URL_SCHEMES):
                raise ValueError(f"image_urls[{k}]: not an https URL or a data: URI: {url[:60]!r}")
        return [u.strip() for u in urls]

    def resolved_size(self) -> tuple[int, int]:
        if self.image_size is None:
            raise ValueError("this edit request takes its size from its first reference image "
                             "(Engine plans it from the decoded image)")
        return super().resolved_size()


class LoraWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., min_length=1, max_length=2048,
                      description="URL or path to the LoRA weights (safetensors): an https URL, a file "
                                  "uploaded to this server, a Hugging Face repo id (or repo/file.safetensors)"
                                  ", or a path under the server's LoRA folder.")
    scale: float = Field(1.0, ge=-4.0, le=4.0, description="How strongly the LoRA applies.")


class FluxKleinLoraInput(FluxKleinInput):
    """Input of `.../lora`: the base input plus 0..3 LoRA adapters."""

    loras: list[LoraWeight] = Field(default_factory=list, max_length=MAX_LORAS,
                                    description="LoRA adapters to apply (at most 3), each {path, scale}.",
                                    json_schema_extra={"ui": "loras"})


class FluxKleinEditLoraInput(FluxKleinEditInput):
    """Input of `.../edit/lora`: reference images and LoRA adapters."""

    loras: list[LoraWeight] = Field(default_factory=list, max_length=MAX_LORAS,
                                    description="LoRA adapters to apply (at most 3), each {path, scale}.",
                                    json_schema_extra={"ui": "loras"})


# ------------------------------------------------------------------------------ distilled checkpoints

DISTILLED_DROPPED = ("negative_prompt", "guidance_scale", "acceleration")  # not in fal's distilled schemas
DISTILLED_STEPS = Field(4, ge=4, le=8, description="Number of denoising steps (the distilled model: 4..8).")


class _Distilled:
    """What the engine reads of the fields a distilled endpoint does not have: no CFG, no negative
    prompt, the lossless acceleration level."""

    negative_prompt = ""
    guidance_scale = 1.0
    acceleration = "regular"

    @property
    def uses_cfg(self) -> bool:
        return False


def _distilled(model: type[FluxKleinInput], name: str, doc: str) -> type[FluxKleinInput]:
    """`model` without the fields the distilled endpoints lack, with 4..8 steps (default 4)."""
    from pydantic import create_model

    fields: dict[str, tuple[Any, Any]] = {k: (f.annotation, f) for k, f in model.model_fields.items()
                                          if k not in DISTILLED_DROPPED}
    fields["num_inference_steps"] = (int, DISTILLED_STEPS)
    distilled = create_model(name, __base__=(_Distilled, model), __doc__=doc, **fields)  # type: ignore[call-overload]
    for k in DISTILLED_DROPPED:  # a subclass cannot drop fields: take them out of the model again
        distilled.model_fields.pop(k, None)
    distilled.model_rebuild(force=True)
    return cast(type[FluxKleinInput], distilled)  # a subclass of `model` (and _Distilled)


FluxKleinDistilledInput = _distilled(FluxKleinInput, "FluxKleinDistilledInput",
                                     "Input of `fal-ai/flux-2/klein/9b` and `.../4b` (distilled: no CFG).")
FluxKleinDistilledEditInput = _distilled(FluxKleinEditInput, "FluxKleinDistilledEditInput",
                                         "Input of the distilled `.../edit` endpoints.")
FluxKleinDistilledLoraInput = _distilled(FluxKleinLoraInput, "FluxKleinDistilledLoraInput",
                                         "Input of the distilled `.../lora` endpoints.")
FluxKleinDistilledEditLoraInput = _distilled(FluxKleinEditLoraInput, "FluxKleinDistilledEditLoraInput",
                                             "Input of the distilled `.../edit/lora` endpoints.")


@dataclass(frozen=True)
class Family:
    """One checkpoint family and the endpoints it serves (`<base_id>`, `/edit`, `/lora`, `/edit/lora`)."""

    name: str  # what `--model NAME=SPEC` calls it
    base_id: str
    title: str
    distilled: bool
    default_repo: str
    licence: str

    def endpoint_ids(self) -> list[str]:
        return [self.base_id + suffix for suffix in ("", "/edit", "/lora", "/edit/lora")]

    def input_model(self, endpoint_id: str) -> type[FluxKleinInput]:
        suffix = endpoint_id[len(self.base_id):]
        plain: dict[str, type[FluxKleinInput]] = {
            "": FluxKleinInput, "/edit": FluxKleinEditInput, "/lora": FluxKleinLoraInput,
            "/edit/lora": FluxKleinEditLoraInput}
        distilled: dict[str, type[FluxKleinInput]] = {
            "": FluxKleinDistilledInput, "/edit": FluxKleinDistilledEditInput,
            "/lora": FluxKleinDistilledLoraInput, "/edit/lora": FluxKleinDistilledEditLoraInput}
        return (distilled if self.distilled else plain)[suffix]


NON_COMMERCIAL = "FLUX Non-Commercial License"
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("9b-base", ENDPOINT_ID, "FLUX.2 [klein] 9B base", False, "black-forest-labs/FLUX.2-klein-base-9B",
           NON_COMMERCIAL),
    Family("9b", "fal-ai/flux-2/klein/9b", "FLUX.2 [klein] 9B", True, "black-forest-labs/FLUX.2-klein-9B",
           NON_COMMERCIAL),
    Family("4b-base", "fal-ai/flux-2/klein/4b/base", "FLUX.2 [klein] 4B base", False,
           "black-forest-labs/FLUX.2-klein-base-4B", "Apache-2.0"),
    Family("4b", "fal-ai/flux-2/klein/4b", "FLUX.2 [klein] 4B", True, "black-forest-labs/FLUX.2-klein-4B",
           "Apache-2.0"),
)}
DEFAULT_FAMILY = "9b-base"


def family_of(endpoint_id: str) -> Family:
    """The family whose endpoints include `endpoint_id` (KeyError when none)."""
    for family in FAMILIES.values():
        if endpoint_id in family.endpoint_ids():
            return family
    raise KeyError(f"no klein family serves {endpoint_id!r}")


def parse_model_specs(text: str | Iterable[str]) -> dict[str, str]:
    """`--model`: one spec (the 9B base family, as before) or `FAMILY=SPEC[,FAMILY=SPEC...]` for
    several checkpoints, e.g. `9b-base=black-forest-labs/FLUX.2-klein-base-9B,9b=/models/klein-9b`.
    A list is the repeated flag (`--model 9b-base=... --model 9b=...`); a part without `FAMILY=` is
    the 9B base family's. ValueError naming the bad part."""
    parts = [text] if isinstance(text, str) else list(text)
    items = [p.strip() for part in parts for p in str(part).split(",") if p.strip()]
    if not items:
        return {DEFAULT_FAMILY: "auto"}
    specs: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep:
            name, spec = DEFAULT_FAMILY, item
        name, spec = name.strip(), spec.strip()
        if not spec:
            raise ValueError(f"{item!r}: expected FAMILY=SPEC (families: {', '.join(FAMILIES)})")
        if name not in FAMILIES:
            raise ValueError(f"{name!r} is not a klein family; expected one of {', '.join(FAMILIES)}")
        if name in specs:
            raise ValueError(f"{name!r} is given twice" + (" (a spec without FAMILY= is the 9b-base one)"
                                                           if name == DEFAULT_FAMILY else ""))
        specs[name] = spec
    return specs


def format_model_specs(specs: Mapping[str, str]) -> str:
    """The inverse of `parse_model_specs`: the 9B base family alone is its bare spec (as before),
    several are `FAMILY=SPEC,...` (what `--model` and KLEINSERVE_MODEL take back)."""
    if list(specs) == [DEFAULT_FAMILY]:
        return specs[DEFAULT_FAMILY]
    return ",".join(f"{name}={spec}" for name, spec in specs.items())


# The input model of each endpoint id (the API registry declares these; the CLI's --endpoint picks one).
INPUT_MODELS: dict[str, type[FluxKleinInput]] = {
    eid: family.input_model(eid) for family in FAMILIES.values() for eid in family.endpoint_ids()}


class OutputImage(BaseModel):
    url: str
    content_type: str
    file_name: str
    file_size: int
    width: int
    height: int


class Timings(BaseModel):
    model_config = ConfigDict(extra="allow")

    encode: float = 0.0
    denoise: float = 0.0
    decode: float = 0.0
    safety: float = 0.0
    total: float = 0.0


class FluxKleinOutput(BaseModel):
    images: list[OutputImage]
    seed: int
    has_nsfw_concepts: list[bool]
    prompt: str
    timings: Timings

    @classmethod
    def from_result(cls, request: FluxKleinInput, result, files: list[tuple[str, str]]) -> FluxKleinOutput:
        """The output of a GenerationResult whose image k is served as files[k] = (url, file_name)."""
        images = [OutputImage(url=url, content_type=im.content_type, file_name=name, file_size=len(im.data),
                              width=im.width, height=im.height)
                  for im, (url, name) in zip(result.images, files, strict=True)]
        return cls(images=images, seed=int(result.seed), has_nsfw_concepts=[bool(im.nsfw) for im in result.images],
                   prompt=request.prompt, timings=Timings(**{k: float(v) for k, v in (result.timings or {}).items()}))


# ------------------------------------------------------------------------------ validation messages

JSON_BODY_HINT = 'send the input as application/json: a JSON object such as {"prompt": "a lighthouse at dusk"}'
_BODY_NOT_OBJECT = {"model_attributes_type", "dict_type", "model_type"}
_RANGE_ERRORS = {"greater_than_equal", "less_than_equal", "greater_than", "less_than"}


def _members(annotation: Any) -> tuple:
    if get_origin(annotation) in (Union, UnionType):
        return get_args(annotation)
    return (annotation,)


def _model_members(annotation: Any) -> list[type[BaseModel]]:
    return [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]


def _is_union(annotation: Any) -> bool:
    return len([m for m in _members(annotation) if m is not type(None)]) > 1


def _bounds(field: FieldInfo) -> tuple[Any, Any, bool, bool]:
    """(low, high, low inclusive, high inclusive) of a numeric field (None: unbounded)."""
    low = high = None
    low_inc = high_inc = True
    for m in field.metadata:
        if getattr(m, "ge", None) is not None:
            low = m.ge
        if getattr(m, "gt", None) is not None:
            low, low_inc = m.gt, False
        if getattr(m, "le", None) is not None:
            high = m.le
        if getattr(m, "lt", None) is not None:
            high, high_inc = m.lt, False
    return low, high, low_inc, high_inc


def _range_message(field: FieldInfo) -> Optional[str]:
    low, high, low_inc, high_inc = _bounds(field)
    if low is not None and high is not None and low_inc and high_inc:
        return f"must be {low}..{high}"
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low_inc else '>'} {low}")
    if high is not None:
        parts.append(f"{'<=' if high_inc else '<'} {high}")
    return ("must be " + " and ".join(parts)) if parts else None


def _preset_message(field_name: str, model: type[BaseModel]) -> str:
    field = model.model_fields[field_name]
    presets = [v for m in _members(field.annotation) if get_origin(m) is Literal for v in get_args(m)]
    objects = _model_members(field.annotation)
    keys = ", ".join(f'"{k}": ...' for k in objects[0].model_fields) if objects else ""
    return ("must be one of " + ", ".join(repr(p) for p in presets)
            + (f", or an object {{{keys}}}" if keys else ""))


def _got(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return f" (got {text[:60] + '...' if len(text) > 60 else text})"


def tidy_validation_errors(errors: Sequence[Mapping[str, Any]],  # read twice
                           model: type[BaseModel] = FluxKleinInput) -> list[dict[str, Any]]:
    """pydantic/FastAPI errors -> one clear `{"loc", "msg", "type"}` per problem.

    - a body that is not a JSON object (a form, text/plain, a list, invalid JSON, nothing): one error
      at `["body"]` saying to send the input as application/json;
    - a union field (`image_size`): only the branch the value was meant for (an object: its fields'
      errors, with the branch tag dropped from `loc`; a string or anything else: one message listing
      the presets and the object form);
    - a number out of range: "must be 64..2048 (got 5000)".
    """
    errors = list(errors)
    out: list[dict[str, Any]] = []
    union_values: dict[str, Any] = {}
    for e in errors:  # what each union field was given (the literal branch's error carries it)
        loc = list(e.get("loc", ()))
        body = 1 if loc[:1] == ["body"] else 0
        if len(loc) > body + 1 and isinstance(loc[body + 1], str) and loc[body + 1].startswith("literal["):
            union_values[str(loc[body])] = e.get("input")
    reported_unions: set[str] = set()
    for e in errors:
        loc = list(e.get("loc", ()))
        kind = str(e.get("type", ""))
        msg = str(e.get("msg", ""))
        body = 1 if loc[:1] == ["body"] else 0
        if body and len(loc) == 1 and kind in _BODY_NOT_OBJECT | {"missing"}:
            msg = ("the body is empty: " if kind == "missing" else "the body is not a JSON object: ") + JSON_BODY_HINT
            out.append({"loc": ["body"], "msg": msg, "type": kind})
            continue
        if kind == "json_invalid":
            where = f" (at character {loc[1]})" if len(loc) > 1 and isinstance(loc[1], int) else ""
            out.append({"loc": ["body"], "msg": f"the body is not valid JSON{where}: {JSON_BODY_HINT}", "type": kind})
            continue
        path = loc[body:]
        name = str(path[0]) if path else ""
        field = model.model_fields.get(name)
        if field is not None and _is_union(field.annotation) and len(path) > 1 and isinstance(path[1], str):
            given = union_values.get(name, e.get("input"))
            if isinstance(given, dict):
                if path[1].startswith("literal["):
                    continue  # an object was given: the preset branch's complaint is noise
                path = [path[0], *path[2:]]  # drop the member tag ("ImageSize")
            else:
                if name in reported_unions:
                    continue
                reported_unions.add(name)
                out.append({"loc": loc[:body] + [name], "msg": _preset_message(name, model) + _got(given),
                            "type": "union_tag_invalid" if isinstance(given, str) else "union_type"})
                continue
        leaf = _leaf_field(model, path)
        if kind in _RANGE_ERRORS and leaf is not None:
            msg = (_range_message(leaf) or msg) + _got(e.get("input"))
        elif kind not in ("missing",) and "input" in e and not isinstance(e.get("input"), (dict, list)):
            msg = msg + _got(e.get("input"))
        item = {"loc": loc[:body] + path, "msg": msg, "type": kind}
        if item not in out:
            out.append(item)
    return out


def _leaf_field(model: type[BaseModel], path: list) -> Optional[FieldInfo]:
    """The FieldInfo at a (tag-free) loc path, through nested models; None when it is not a field."""
    current: Optional[type[BaseModel]] = model
    found: Optional[FieldInfo] = None
    for part in path:
        if current is None or not isinstance(part, str) or part not in current.model_fields:
            return None
        found = current.model_fields[part]
        members = _model_members(found.annotation)
        current = members[0] if members else None
    return found
