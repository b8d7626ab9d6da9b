"""Tensors only: model loading, prompt encoding, the denoising loop, safety checking, encoding.

Public interface (used by service/ and cli.py): `load_engine(spec, ...) -> Engine` and
`Engine.generate(request, on_step=..., should_cancel=..., preview_every=...) -> GenerationResult`, and
`Engine.generate_batch([GenerationTask, ...])` for requests with equal `Engine.batch_key` that share
every transformer forward.
"""

from .types import (
    EncodedImage,
    GenerationCancelled,
    GenerationResult,
    GenerationTask,
    ModelInfo,
    ModelUnavailable,
    StepEvent,
)

__all__ = [
    "EncodedImage",
    "Engine",
    "GenerationCancelled",
    "GenerationResult",
    "GenerationTask",
    "ModelInfo",
    "ModelUnavailable",
    "StepEvent",
    "load_engine",
]


def __getattr__(name):
    # Lazy: importing the types must not pull torch/diffusers in (the service's HTTP layer imports them).
    if name in ("Engine", "load_engine"):
        from . import engine as _engine

        return getattr(_engine, name)
    raise AttributeError(name)
