"""Several checkpoints on one device: engines loaded on demand, the least recently used evicted to fit.

    pool = EnginePool({"9b-base": "black-forest-labs/FLUX.2-klein-base-9B", "9b": "/models/klein-9b"},
                      device="cuda", dtype=None, budget_bytes=None)      # None: what the device has
    engine = pool.engine_for("9b")        # one family, behind the same interface as an Engine
    engine.generate_batch(tasks)          # loads "9b" (evicting others if needed), runs, under the pool lock

One run at a time per pool (a device runs one batch at a time anyway): `lease(family)` holds the pool
lock while a run uses its engine, so eviction never pulls weights from under a running batch. A model
stays resident while the budget allows; `budget_bytes` defaults to 90 % of the CUDA device's memory
(no limit on CPU). Each family's `FamilyEngine` is what a worker holds instead of an Engine: one worker
per family, claiming only that family's endpoints (`EndpointRegistry.subset(family)`).

The device's turn (`turn()`): the family workers of one pool take turns first-come first-served, and a
worker claims a job only while it holds the turn. So a claimed job never waits behind another family's
run (nor is shown IN_PROGRESS meanwhile: it stays queued, where another worker of the fleet may take
it); once claimed, a family that is not resident is loaded right then (`ensure_loaded`, evicting the
least recently used), the job's log says so, and its run-time limit starts after the load.
`info` never loads nor waits: it is the family's last known ModelInfo (or what its spec says before
the first load), so a worker's registration heartbeat never blocks behind a run.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import torch

from .types import ModelInfo, ModelUnavailable

log = logging.getLogger(__name__)

BUDGET_FRACTION = 0.9  # of the device's memory, when no budget is given


def engine_bytes(engine: Any) -> int:
    """Bytes of the parameters and buffers an engine holds on its device (its three models)."""
    total = 0
    for name in ("transformer", "vae"):
        module = getattr(engine, name, None)
        if module is not None:
            total += sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    text = getattr(getattr(engine, "text", None), "model", None)
    if text is not None and not getattr(engine.text, "offload", False):
        total += sum(t.numel() * t.element_size() for t in text.parameters())
    return total


class EnginePool:
    def __init__(self, specs: Mapping[str, str], *, loader: Optional[Callable[[str], Any]] = None,
                 device: Any = None, dtype: Any = None, cpu_offload: bool = False,
                 budget_bytes: Optional[int] = None):
        if not specs:
            raise ValueError("an engine pool needs at least one model spec")
        self.specs = dict(specs)
        self._loader = loader or self._load
        self.device, self.dtype, self.cpu_offload = device, dtype, cpu_offload
        self.budget_bytes = budget_bytes if budget_bytes is not None else self._default_budget()
        self._engines: OrderedDict[str, Any] = OrderedDict()  # family -> Engine, least recently used first
        self._sizes: dict[str, int] = {}
        self._lock = threading.RLock()
        self.loads = 0
        self.evictions: list[str] = []
        self.loading: Optional[str] = None  # the family being loaded now
        self.errors: dict[str, str] = {}  # family -> why its last load failed
        self._infos: dict[str, ModelInfo] = {}  # family -> its engine's info (kept after eviction)
        self._turn = threading.Condition()
        self._turn_queue: list[object] = []  # waiting for the device's turn, first come first served
        self._turn_holder: Optional[object] = None

    def _default_budget(self) -> Optional[int]:
        dev = torch.device(self.device) if self.device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        if dev.type != "cuda":
            return None
        return int(torch.cuda.get_device_properties(dev).total_memory * BUDGET_FRACTION)

    def _load(self, spec: str) -> Any:
        from .engine import load_engine

        return load_engine(spec, device=self.device, dtype=self.dtype, cpu_offload=self.cpu_offload)

    @property
    def families(self) -> list[str]:
        return list(self.specs)

    def loaded(self) -> list[str]:
        """Families resident now, least recently used first (never waits for a run)."""
        return list(self._engines)

    def state(self, family: str) -> str:
        """resident | loading | failed (its last load) | not_loaded; never waits for a run."""
        if family in self._engines:
            return "resident"
        if self.loading == family:
            return "loading"
        return "failed" if family in self.errors else "not_loaded"

    def info(self, family: str) -> ModelInfo:
        """The family's ModelInfo without loading or waiting: its engine's (kept after an eviction), or
        before its first load what its spec says."""
        engine = self._engines.get(family)
        if engine is not None:
            return engine.info
        if family in self._infos:
            return self._infos[family]
        spec = self.specs[family]
        return ModelInfo(spec=spec, source=spec, is_tiny=spec in ("tiny", "tiny-distilled"),
                         device=str(self.device or "auto"), dtype=str(self.dtype or "auto"), load_seconds=0.0,
                         distilled=spec == "tiny-distilled")

    def ensure_loaded(self, family: str) -> bool:
        """Loads the family now unless it is resident (evicting as the budget needs); True when it
        loaded. Callers that run next hold `turn()` so nothing evicts it in between."""
        with self._lock:
            resident = family in self._engines
            self._get(family)
            return not resident

    @contextlib.contextmanager
    def turn(self, give_up: Callable[[], bool] = lambda: False) -> Iterator[bool]:
        """The device's turn among this pool's workers, first come first served: yields True while
        held; False (without it) when `give_up()` became true while waiting (a worker stopping)."""
        me = object()
        with self._turn:
            self._turn_queue.append(me)
            while self._turn_holder is not None or self._turn_queue[0] is not me:
                if give_up():
                    self._turn_queue.remove(me)
                    self._turn.notify_all()
                    break
                self._turn.wait(0.1)
            else:
                self._turn_queue.pop(0)
                self._turn_holder = me
        if self._turn_holder is not me:
            yield False
            return
        try:
            yield True
        finally:
            with self._turn:
                self._turn_holder = None
                self._turn.notify_all()

    @contextlib.contextmanager
    def lease(self, family: str) -> Iterator[Any]:
        """The family's engine, loaded (others evicted as the budget needs), held for one run."""
        with self._lock:
            yield self._get(family)

    def _get(self, family: str) -> Any:
        if family not in self.specs:
            raise ModelUnavailable(f"no checkpoint is configured for the {family!r} family "
                                   f"(configured: {', '.join(self.specs)})")
        if family in self._engines:
            self._engines.move_to_end(family)
            return self._engines[family]
        self.loading = family
        try:
            engine = self._loader(self.specs[family])
        except Exception as exc:
            self.errors[family] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.loading = None
        self.errors.pop(family, None)
        self._infos[family] = engine.info
        size = engine_bytes(engine)
        self._engines[family] = engine
        self._sizes[family] = size
        self.loads += 1
        self._evict(keep=family)
        log.info("model %s (%s) loaded: %.1f GB; resident: %s", family, self.specs[family], size / 1e9,
                 ", ".join(self._engines))
        return engine

    def _evict(self, keep: str) -> None:
        if self.budget_bytes is None:
            return
        evicted = False
        while sum(self._sizes[f] for f in self._engines) > self.budget_bytes and len(self._engines) > 1:
            victim = next(f for f in self._engines if f != keep)
            self._engines.pop(victim)
            self._sizes.pop(victim, None)
            self.evictions.append(victim)
            evicted = True
            log.info("model %s evicted to make room for %s", victim, keep)
        if evicted and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def engine_for(self, family: str) -> FamilyEngine:
        if family not in self.specs:
            raise ModelUnavailable(f"no checkpoint is configured for the {family!r} family")
        return FamilyEngine(self, family)


class FamilyEngine:
    """One family of a pool with an Engine's interface (what a worker calls): every call that needs
    weights leases the family's engine, loading it when it is not resident."""

    def __init__(self, pool: EnginePool, family: str):
        self.pool = pool
        self.family = family

    @property
    def info(self) -> ModelInfo:
        """Never loads nor waits (EnginePool.info)."""
        return self.pool.info(self.family)

    @property
    def state(self) -> str:
        return self.pool.state(self.family)

    def turn(self, give_up: Callable[[], bool] = lambda: False):
        """The device's turn (EnginePool.turn): a worker claims and runs only while it holds it."""
        return self.pool.turn(give_up)

    def ensure_loaded(self) -> bool:
        return self.pool.ensure_loaded(self.family)

    def batch_key(self, request) -> Optional[tuple]:
        """The engine's batch key, without loading weights (it only reads the request)."""
        from .engine import request_batch_key

        return request_batch_key(request)

    def generate_batch(self, tasks: Sequence[Any], **kw: Any):
        with self.pool.lease(self.family) as engine:
            return engine.generate_batch(tasks, **kw)

    def generate(self, request, **kw: Any):
        with self.pool.lease(self.family) as engine:
            return engine.generate(request, **kw)

    def __getattr__(self, name: str) -> Any:  # warmup, set_cns_matrix, ...: the loaded engine's
        if name.startswith("_"):
            raise AttributeError(name)
        with self.pool.lease(self.family) as engine:
            return getattr(engine, name)
