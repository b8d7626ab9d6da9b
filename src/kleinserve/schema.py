"""The endpoint's input and output schema: the one source of truth.

Validation (API and CLI), the OpenAPI document, the CLI flags and the playground form are all
generated from these models, so a field added here shows up everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class ImageSize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    width: int = Field(512, ge=64, le=2048, description="Width in pixels; rounded to a multiple of 16.")
    height: int = Field(512, ge=64, le=2048, description="Height in pixels; rounded to a multiple of 16.")


def round_to_multiple(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    """Nearest multiple (ties round up), never below one multiple."""
    return max(multiple, int((value + multiple // 2) // multiple) * multiple)


class FluxKleinInput(BaseModel):
    """Input of `fal-ai/flux-2/klein/9b/base`."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., min_length=1, description="The prompt to generate an image from.",
                        json_schema_extra={"ui": "textarea"})
    negative_prompt: str = Field("", description="What the image should not contain (true CFG).",
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


def _distilled(model: type[BaseModel], name: str, doc: str) -> type[BaseModel]:
    """`model` without the fields the distilled endpoints lack, with 4..8 steps (default 4)."""
    from pydantic import create_model

    fields = {k: (f.annotation, f) for k, f in model.model_fields.items() if k not in DISTILLED_DROPPED}
    fields["num_inference_steps"] = (int, DISTILLED_STEPS)
    distilled = create_model(name, __base__=(_Distilled, model), __doc__=doc, **fields)  # type: ignore[call-overload]
    for k in DISTILLED_DROPPED:  # a subclass cannot drop fields: take them out of the model again
        distilled.model_fields.pop(k, None)
    distilled.model_rebuild(force=True)
    return distilled


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

    def input_model(self, endpoint_id: str) -> type[BaseModel]:
        suffix = endpoint_id[len(self.base_id):]
        plain = {"": FluxKleinInput, "/edit": FluxKleinEditInput, "/lora": FluxKleinLoraInput,
                 "/edit/lora": FluxKleinEditLoraInput}
        distilled = {"": FluxKleinDistilledInput, "/edit": FluxKleinDistilledEditInput,
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


def parse_model_specs(text: str) -> dict[str, str]:
    """`--model`: one spec (the 9B base family, as before) or `FAMILY=SPEC[,FAMILY=SPEC...]` for
    several checkpoints, e.g. `9b-base=black-forest-labs/FLUX.2-klein-base-9B,9b=/models/klein-9b`.
    ValueError naming the bad part."""
    text = (text or "").strip() or "auto"
    if "=" not in text:
        return {DEFAULT_FAMILY: text}
    specs: dict[str, str] = {}
    for part in text.split(","):
        name, sep, spec = part.partition("=")
        name, spec = name.strip(), spec.strip()
        if not sep or not spec:
            raise ValueError(f"{part.strip()!r}: expected FAMILY=SPEC (families: {', '.join(FAMILIES)})")
        if name not in FAMILIES:
            raise ValueError(f"{name!r} is not a klein family; expected one of {', '.join(FAMILIES)}")
        if name in specs:
            raise ValueError(f"{name!r} is given twice")
        specs[name] = spec
    return specs


# The input model of each endpoint id (the API registry declares these; the CLI's --endpoint picks one).
INPUT_MODELS: dict[str, type[BaseModel]] = {
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
    def from_result(cls, request: FluxKleinInput, result, files: list[tuple[str, str]]) -> "FluxKleinOutput":
        """The output of a GenerationResult whose image k is served as files[k] = (url, file_name)."""
        images = [OutputImage(url=url, content_type=im.content_type, file_name=name, file_size=len(im.data),
                              width=im.width, height=im.height)
                  for im, (url, name) in zip(result.images, files)]
        return cls(images=images, seed=int(result.seed), has_nsfw_concepts=[bool(im.nsfw) for im in result.images],
                   prompt=request.prompt, timings=Timings(**{k: float(v) for k, v in (result.timings or {}).items()}))
