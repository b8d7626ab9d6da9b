"""The NSFW checker (open_nsfw on CPU onnxruntime), on synthetic images only."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from kleinserve.engine.safety import (
    DEFAULT_THRESHOLD,
    ENV_THRESHOLD,
    SafetyChecker,
    blacken,
    default_checker,
    threshold_from_env,
)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(1234)
    noise = rng.integers(0, 256, size=(96, 160, 3), dtype=np.uint8)
    ramp = np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (40, 1))
    return [
        Image.new("RGB", (64, 64), (210, 160, 130)),  # flat skin-ish tone
        Image.fromarray(noise, "RGB"),  # 160x96 noise
        Image.fromarray(ramp, "L"),  # grayscale, 300x40
        Image.new("RGBA", (33, 517), (20, 120, 220, 255)),  # odd size, alpha
    ]


@pytest.fixture(scope="module")
def checker() -> SafetyChecker:
    return SafetyChecker(threshold=0.8)


def test_scores_in_unit_interval_for_mixed_sizes(checker):
    images = _images()
    scores = checker.scores(images)
    assert len(scores) == len(images)
    for s in scores:
        assert isinstance(s, float)
        assert 0.0 <= s <= 1.0


def test_scores_are_deterministic(checker):
    images = _images()
    assert checker.scores(images) == checker.scores(images)
    # One at a time gives the same scores as the batch.
    single = [checker.scores([im])[0] for im in images]
    assert single == pytest.approx(checker.scores(images), abs=1e-5)
    # A fresh checker (new session) too.
    assert SafetyChecker(threshold=0.5).scores(images) == pytest.approx(checker.scores(images), abs=1e-6)


def test_empty_batch(checker):
    assert checker.scores([]) == []
    assert checker.flags([]) == []


def test_threshold_zero_flags_everything_and_above_one_nothing(checker):
    images = _images()
    everything = SafetyChecker(threshold=0.0)
    nothing = SafetyChecker(threshold=1.01)
    assert everything.flags(images) == [True] * len(images)
    assert nothing.flags(images) == [False] * len(images)


def test_flags_follow_scores(checker):
    images = _images()
    scores = checker.scores(images)
    mid = sorted(scores)[len(scores) // 2]
    c = SafetyChecker(threshold=mid)
    assert c.flags(images) == [s >= mid for s in scores]


def test_apply_blackens_flagged_images_keeping_sizes():
    images = _images()
    out, flags = SafetyChecker(threshold=0.0).apply(images)
    assert flags == [True] * len(images)
    for src, dst in zip(images, out, strict=True):
        assert dst.size == src.size
        assert dst.mode == "RGB"
        assert dst.getextrema() == ((0, 0), (0, 0), (0, 0))
    out, flags = SafetyChecker(threshold=1.01).apply(images)
    assert flags == [False] * len(images)
    assert all(a is b for a, b in zip(out, images, strict=True))


def test_blacken():
    im = Image.new("RGB", (31, 17), (255, 255, 255))
    black = blacken(im)
    assert black.size == (31, 17)
    assert black.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_threshold_from_environment(monkeypatch):
    monkeypatch.delenv(ENV_THRESHOLD, raising=False)
    assert threshold_from_env() == DEFAULT_THRESHOLD == 0.8
    assert SafetyChecker().threshold == 0.8
    monkeypatch.setenv(ENV_THRESHOLD, "0.35")
    assert SafetyChecker().threshold == 0.35
    assert SafetyChecker(threshold=0.9).threshold == 0.9  # an explicit value wins
    monkeypatch.setenv(ENV_THRESHOLD, "lots")
    with pytest.raises(ValueError, match=ENV_THRESHOLD):
        SafetyChecker()


def test_lazy_and_thread_safe_loading():
    c = SafetyChecker(threshold=0.8)
    assert not c.loaded  # constructing is free
    sessions = []
    barrier = threading.Barrier(4)

    def load():
        barrier.wait()
        sessions.append(c.load())

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.loaded
    assert len(sessions) == 4 and all(s is sessions[0] for s in sessions)


def test_concurrent_scoring_matches_serial(checker):
    images = _images()
    expected = checker.scores(images)
    results: list[list[float]] = []

    def run():
        results.append(checker.scores(images))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == pytest.approx(expected, abs=1e-6) for r in results)


def test_default_checker_is_shared():
    assert default_checker() is default_checker()
