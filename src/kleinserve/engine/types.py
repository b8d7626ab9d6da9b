"""The engine's public interface: what the service and the CLI may rely on.

The engine works on tensors and returns encoded image bytes; it knows nothing about HTTP, jobs or
storage. `Engine.generate` is synchronous and runs on the caller's thread (the service runs it in a
worker thread); progress goes out through `on_step`, cancellation comes in through `should_cancel`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from PIL import Image

if TYPE_CHECKING:
    from ..schema import FluxKleinInput


class GenerationCancelled(Exception):
    """Raised by `Engine.generate` when `should_cancel()` returned True between two steps."""


class ModelUnavailable(RuntimeError):
    """The model spec cannot be loaded (missing folder, unreachable hub, bad layout). Says what to do."""


@dataclass(frozen=True)
class StepEvent:
    step: int  # 1-based: the step that has just finished
    total: int
    sigma: float  # sigma reached after this step
    preview: Optional[Image.Image] = None  # small RGB image of the current x0 estimate, when asked for


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    content_type: str  # "image/png" | "image/jpeg" | "image/webp"
    extension: str  # "png" | "jpeg" | "webp"
    width: int
    height: int
    seed: int  # the seed this image was generated from (request seed + index)
    nsfw: bool  # True when the safety checker flagged it (data is then a black image)


@dataclass
class GenerationResult:
    images: list[EncodedImage]
    seed: int  # the request's base seed (the one reported in the output)
    timings: dict[str, float]  # encode, denoise, decode, safety, total (seconds)
    techniques: list[str] = field(default_factory=list)  # acceleration techniques that actually ran
    logs: list[str] = field(default_factory=list)  # human-readable notes (e.g. which CNS matrix served)


@dataclass(frozen=True)
class ModelInfo:
    spec: str  # what was asked for ("auto", "tiny", a folder, a repo id)
    source: str  # what was loaded (folder path, repo id, or "tiny")
    is_tiny: bool  # True: random tiny weights, NOT the real model
    device: str
    dtype: str
    load_seconds: float
    distilled: bool = False  # a distilled checkpoint (is_distilled): served without CFG


StepCallback = Callable[[StepEvent], None]
CancelCheck = Callable[[], bool]


@dataclass
class GenerationTask:
    """One request inside `Engine.generate_batch`, with its own progress and cancellation hooks.

    should_cancel: polled before every step (a pure question: no side effects); once it returns True
    the task is out (its rows leave the transformer batch, its outcome is GenerationCancelled) and it
    is not polled or called back again.
    wants_preview: whether a preview is worth a VAE decode right now (someone is watching).
    on_done: called exactly once with the task's outcome as soon as it is known (a cancelled task at
    once, while the others run on), unless the shared part of the run fails (generate_batch raises).
    reference_images: the decoded reference images of an edit request (RGB), in `image_urls` order.
    loras: the LoRA files of the request, resolved to local files, in `loras` order."""

    request: FluxKleinInput
    on_step: Optional[StepCallback] = None
    should_cancel: Optional[CancelCheck] = None
    wants_preview: Optional[Callable[[], bool]] = None
    on_done: Optional[Callable[[GenerationResult | Exception], None]] = None
    reference_images: Sequence[Image.Image] = ()
    loras: Sequence[LoraFile] = ()


@dataclass(frozen=True)
class LoraFile:
    """One LoRA of a request: its local safetensors file, its scale, and the name the user gave it
    (`path` as requested: what the logs and errors say)."""

    file: Path
    scale: float
    name: str


class LoraFormatError(ValueError):
    """A LoRA file that none of diffusers' Flux2 LoRA conversions understands (or that does not fit
    the model). The message names the problem; the service turns it into a 422."""
