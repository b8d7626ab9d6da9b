"""Several checkpoints on one device (engine/pool.py): families loaded on demand, the least recently
used evicted past the memory budget, runs leased under one lock; a family's engine has the Engine
interface a worker uses. Real tiny engines (base and distilled twin)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kleinserve.endpoints import default_registry
from kleinserve.engine.pool import EnginePool, engine_bytes
from kleinserve.engine.types import GenerationTask, ModelUnavailable
from kleinserve.schema import FluxKleinDistilledInput, FluxKleinInput

KW = dict(prompt="a fox", seed=2, image_size={"width": 64, "height": 64}, num_inference_steps=4,
          enable_safety_checker=False)


@pytest.fixture(scope="module")
def sizes():
    from kleinserve.engine import load_engine

    return engine_bytes(load_engine("tiny", device="cpu", dtype="float32"))


def pool(budget=None):
    return EnginePool({"9b-base": "tiny", "9b": "tiny-distilled"}, device="cpu", dtype="float32",
                      budget_bytes=budget)


def test_families_load_on_demand_and_serve_their_own_checkpoint(tiny_engine):
    p = pool()
    assert p.loaded() == []
    base, distilled = p.engine_for("9b-base"), p.engine_for("9b")
    assert base.batch_key(FluxKleinInput(**KW)) is not None and p.loaded() == []  # keys load nothing
    a = base.generate(FluxKleinInput(**KW, guidance_scale=1.0))
    b = distilled.generate(FluxKleinDistilledInput(**KW))
    assert p.loaded() == ["9b-base", "9b"] and p.loads == 2
    assert distilled.info.distilled and not base.info.distilled
    assert a.images[0].data == tiny_engine.generate(FluxKleinInput(**KW, guidance_scale=1.0)).images[0].data
    assert a.images[0].data != b.images[0].data
    out = base.generate_batch([GenerationTask(FluxKleinInput(**{**KW, "seed": 5}))])
    assert out[0].seed == 5 and p.loads == 2  # resident: not loaded again


def test_the_least_recently_used_is_evicted_past_the_budget(sizes):
    p = pool(budget=int(sizes * 1.5))  # room for one
    p.engine_for("9b-base").generate(FluxKleinInput(**KW))
    p.engine_for("9b").generate(FluxKleinDistilledInput(**KW))
    assert p.loaded() == ["9b"] and p.evictions == ["9b-base"]
    p.engine_for("9b-base").generate(FluxKleinInput(**KW))
    assert p.loaded() == ["9b-base"] and p.loads == 3


def test_runs_are_leased_one_at_a_time():
    p = pool()
    order: list[str] = []

    def run(family, request):
        with p.lease(family) as engine:
            order.append(f"start {family}")
            engine.generate(request)
            time.sleep(0.05)
            order.append(f"end {family}")

    threads = [threading.Thread(target=run, args=("9b-base", FluxKleinInput(**KW))),
               threading.Thread(target=run, args=("9b", FluxKleinDistilledInput(**KW)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order[0].startswith("start") and order[1].startswith("end") and order[0][6:] == order[1][4:]


def test_an_unknown_family_is_a_clear_error():
    with pytest.raises(ModelUnavailable, match="no checkpoint is configured for the '4b' family"):
        pool().engine_for("4b")
    with pytest.raises(ValueError, match="at least one"):
        EnginePool({})


def test_registry_subsets_per_family():
    registry = default_registry(["9b-base", "9b"])
    assert registry.engines() == ["9b-base", "9b"]
    sub = registry.subset("9b")
    assert sub.ids() == ["fal-ai/flux-2/klein/9b", "fal-ai/flux-2/klein/9b/edit", "fal-ai/flux-2/klein/9b/lora",
                         "fal-ai/flux-2/klein/9b/edit/lora"]
    assert "fal-ai/flux-2/klein/4b" in sub.unserved
    np.testing.assert_equal(len(registry.subset("9b-base")), 4)


def test_info_and_state_never_load_and_a_failed_load_is_reported(tmp_path):
    p = EnginePool({"9b-base": "tiny", "9b": "tiny-distilled", "4b": str(tmp_path / "missing")}, device="cpu",
                   dtype="float32")
    fam = p.engine_for("9b")
    assert fam.info.spec == "tiny-distilled" and fam.info.is_tiny and fam.state == "not_loaded"
    assert p.loaded() == []  # asking loaded nothing
    assert fam.ensure_loaded() is True and fam.state == "resident" and fam.info.distilled
    assert fam.ensure_loaded() is False and p.loads == 1
    with pytest.raises(ModelUnavailable):
        p.ensure_loaded("4b")
    assert p.state("4b") == "failed" and "ModelUnavailable" in p.errors["4b"] and p.loaded() == ["9b"]


def test_the_device_turn_is_first_come_first_served_and_can_be_given_up():
    p = pool()
    order: list[str] = []
    stop_c = threading.Event()
    first_holds = threading.Event()
    release_first = threading.Event()

    def first():
        with p.turn() as mine:
            order.append(f"first {mine}")
            first_holds.set()
            release_first.wait(10)

    def waiter(name, give_up=lambda: False):
        with p.turn(give_up) as mine:
            order.append(f"{name} {mine}")

    a = threading.Thread(target=first)
    a.start()
    first_holds.wait(10)
    b = threading.Thread(target=waiter, args=("second",))
    b.start()
    time.sleep(0.2)
    c = threading.Thread(target=waiter, args=("third", stop_c.is_set))
    c.start()
    time.sleep(0.2)
    stop_c.set()  # a stopping worker stops waiting
    c.join(5)
    assert order == ["first True", "third False"]
    release_first.set()
    for t in (a, b):
        t.join(5)
    assert order == ["first True", "third False", "second True"]
    with p.turn() as mine:  # free again
        assert mine
