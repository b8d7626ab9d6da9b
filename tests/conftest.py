"""Shared fixtures: the tiny model, in-process and as a diffusers-layout folder (both session-scoped)."""

from __future__ import annotations

import os

import pytest

# The tiny model's matrices are far too small to gain from intra-op threads, and OpenMP worker threads
# spin-wait: on a busy (shared) CPU, 2 threads made tiny generations ~15x slower than 1. Set before
# torch is imported (test modules import it after conftest), and inherited by CLI subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium for a page-test module (tests/browser_helpers.py; the module skips without it)."""
    from browser_helpers import chromium

    with chromium() as b:
        yield b


@pytest.fixture(scope="session")
def tiny_engine():
    """An Engine on the tiny random model, CPU, float32 (shared: don't mutate it)."""
    from kleinserve.engine import load_engine

    return load_engine("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny model saved in diffusers layout (Flux2KleinPipeline(...).save_pretrained)."""
    from kleinserve.engine.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "flux2-klein-tiny")


# PostgreSQL: a throwaway cluster per session (`pg_cluster`) and a fresh database per test (`pg_url`).
from pg_server import pg_cluster, pg_url  # noqa: E402,F401

# S3: a throwaway Ceph RGW per session (`s3_server`) and a fresh bucket prefix per test (`s3_url`).
from s3_server import s3_server, s3_url  # noqa: E402,F401
