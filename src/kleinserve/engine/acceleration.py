"""What the `acceleration` levels switch on, around one `Flux2Transformer2DModel`.

    acc = Accelerator(transformer, device, dtype)
    fn, techniques = acc.forward("regular")   # once per generation: fn carries that run's block cache
    out = fn(hidden_states=..., encoder_hidden_states=..., timestep=..., img_ids=..., txt_ids=...,
             guidance=None, joint_attention_kwargs=None, return_dict=False)   # -> (sample,)
    acc.warmup_presets()   # at startup: compile every preset size (a no-op where nothing compiles)

After `warmup`, a compiled level runs under the ``eager_on_recompile`` stance: a shape the warm-up did not
cover runs eagerly (same result, slower) rather than stalling a request on a compile.

Levels (see docs/PERFORMANCE.md for the measured costs):

- ``none``: the transformer's own eager forward, under ``torch.compiler.set_stance("force_eager")`` so the
  blocks that `regular` compiled in place run eagerly here. The numerical reference.
- ``regular``: lossless. Regional ``torch.compile`` of the repeated blocks (diffusers'
  ``ModelMixin.compile_repeated_blocks``: both block classes, compiled once per shape, re-used by every
  block of the class) and, on CUDA, the cuDNN / flash SDPA kernels ahead of the others. Compiling is on by
  default on CUDA and off on CPU (inductor on CPU needs a C++ compiler and minutes of warm-up); the
  environment variable ``KLEINSERVE_COMPILE=1`` / ``0`` forces it either way.
- ``high``: ``regular`` plus FP8 (float8 e4m3) dynamic per-row quantization of the Linear layers of the
  blocks (torchao; CUDA with compute capability >= 8.9 only) and a first-block residual cache
  (`FirstBlockCache`): when the first block's residual barely changed since the last fully computed step,
  the other blocks are skipped and their last residual is re-used. It runs on a *separate* module tree
  that shares every parameter with the reference model (so ``none`` and ``regular`` stay exact); FP8
  replaces the Linear weights of that tree only, which costs the FP8 copy of those weights (about half
  of the bf16 transformer) in memory. Where FP8 cannot run it says so in ``techniques`` and the block
  cache still runs.

Compiling mutates the blocks in place (``module.compile()`` sets the module's compiled call); that is why
`none` runs under the ``force_eager`` stance rather than on an uncompiled copy: one set of weights, two
ways of running them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

LEVELS = ("none", "regular", "high")

# First-block cache defaults: relative L1 change of the first block's residual below which the other
# blocks are skipped; the first `warmup_steps` steps and every `max_consecutive`+1-th step always run fully.
DEFAULT_CACHE_THRESHOLD = 0.08
DEFAULT_CACHE_WARMUP_STEPS = 3
DEFAULT_CACHE_MAX_CONSECUTIVE = 3


def _env_flag(name: str) -> Optional[bool]:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip().lower() not in ("0", "false", "no", "off")


def fp8_support(device: torch.device) -> tuple[bool, str]:
    """(available, reason): FP8 rowwise GEMMs need CUDA sm_89+ and torchao."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "no CUDA sm_89+"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"sm_{major}{minor} < sm_89"
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow  # noqa: F401
    except Exception as exc:  # not installed, or built for another torch
        return False, f"torchao unavailable: {type(exc).__name__}; pip install 'kleinserve[gpu]'"
    return True, ""


# ----------------------------------------------------------------------------------------------------
# First-block cache
# ----------------------------------------------------------------------------------------------------


@dataclass
class _CacheSlot:
    ref_residual: Optional[torch.Tensor] = None  # first block's residual at the last full step
    tail: Optional[torch.Tensor] = None  # what the other blocks added (image stream) at the last full step
    prev_tail: Optional[torch.Tensor] = None  # ... and at the full step before (TaylorSeer, order 1)
    tail_step: int = -1
    prev_tail_step: int = -1
    consecutive: int = 0


@dataclass
class FirstBlockCache:
    """Per-generation state of the first-block residual cache (FBCache / DBCache "F1B0" style).

    At each step the first double-stream block always runs. Its image-stream residual is compared with
    the one of the last *fully computed* step; when ``mean|r - r_ref| / mean|r_ref| < threshold``, the
    step is past ``warmup_steps`` and fewer than ``max_consecutive`` steps in a row were skipped, the
    remaining blocks are skipped and the image-stream residual they added at the last full step is
    re-used (with ``taylor=True``: extrapolated linearly from the last two full steps, TaylorSeer order 1).
    The reference only moves on full steps, so drift accumulates until it forces a full step.
    ``threshold=0`` never skips (output identical to the uncached forward).

    One state per call position within a step (a caller that runs cond and uncond as two forwards at the
    same timestep gets two independent caches); a new shape or a timestep that goes up starts over.
    """

    threshold: float = DEFAULT_CACHE_THRESHOLD
    warmup_steps: int = DEFAULT_CACHE_WARMUP_STEPS
    max_consecutive: int = DEFAULT_CACHE_MAX_CONSECUTIVE
    taylor: bool = False
    forwards: int = 0
    skipped: int = 0
    _slots: list = field(default_factory=list)
    _slot: int = 0
    _step: int = -1
    _shape: Optional[tuple] = None
    _last_t: Optional[float] = None

    @property
    def name(self) -> str:
        return f"first_block_cache({self.threshold:g}{',taylor' if self.taylor else ''})"

    def reset(self) -> None:
        self.forwards = self.skipped = 0
        self._slots = []
        self._slot = 0
        self._step = -1
        self._shape = None
        self._last_t = None

    def begin(self, shape: tuple, t: float) -> _CacheSlot:
        """Called at the start of each forward; returns the state for this call."""
        if self._shape != shape or (self._last_t is not None and t > self._last_t + 1e-6):
            self.reset()
            self._shape = shape
        if self._last_t is not None and abs(t - self._last_t) <= 1e-6:
            self._slot += 1  # another forward at the same step
        else:
            self._slot = 0
            self._step += 1
        self._last_t = t
        while len(self._slots) <= self._slot:
            self._slots.append(_CacheSlot())
        self.forwards += 1
        return self._slots[self._slot]

    def should_skip(self, slot: _CacheSlot, residual: torch.Tensor) -> bool:
        # Decided without the residual first: the comparison below is a host sync (.item()) on CUDA.
        if slot.ref_residual is None or slot.tail is None:
            return False
        if self.threshold <= 0 or self._step < self.warmup_steps or slot.consecutive >= self.max_consecutive:
            return False
        ref = slot.ref_residual.float()
        diff = ((residual.float() - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12)).item()
        return diff < self.threshold

    def cached_tail(self, slot: _CacheSlot) -> torch.Tensor:
        assert slot.tail is not None  # only after should_skip, which needs a tail
        if not self.taylor or slot.prev_tail is None or slot.tail_step <= slot.prev_tail_step:
            return slot.tail
        k = (self._step - slot.tail_step) / (slot.tail_step - slot.prev_tail_step)
        return slot.tail + k * (slot.tail - slot.prev_tail)

    def store(self, slot: _CacheSlot, first_residual: torch.Tensor, tail: torch.Tensor) -> None:
        slot.ref_residual = first_residual
        if self.taylor:
            slot.prev_tail, slot.prev_tail_step = slot.tail, slot.tail_step
        slot.tail, slot.tail_step = tail, self._step
        slot.consecutive = 0

    def summary(self) -> str:
        return f"{self.name}: skipped the other blocks at {self.skipped} of {self.forwards} forwards"


def _flux2_forward_cached(model, cache: FirstBlockCache, hidden_states, encoder_hidden_states=None, timestep=None,
                          img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None,
                          return_dict: bool = False, **unsupported):
    """`Flux2Transformer2DModel.forward` (text-to-image path, no KV cache) with the first-block cache.

    Mirrors diffusers 0.42's forward step by step; `tests/test_acceleration.py` checks that with the
    cache off it gives the same output as the model's own forward.
    """
    if unsupported.get("kv_cache_mode") is not None or unsupported.get("kv_cache") is not None:
        raise NotImplementedError("the block cache does not support reference-image KV caching")
    if joint_attention_kwargs and "scale" in joint_attention_kwargs:
        raise NotImplementedError("LoRA scale is not supported with the block cache")

    num_txt_tokens = encoder_hidden_states.shape[1]
    slot = cache.begin((tuple(hidden_states.shape), num_txt_tokens), float(timestep.flatten()[0]))

    timestep = timestep.to(hidden_states.dtype) * 1000
    if guidance is not None:
        guidance = guidance.to(hidden_states.dtype) * 1000
    temb = model.time_guidance_embed(timestep, guidance)
    double_mod_img = model.double_stream_modulation_img(temb)
    double_mod_txt = model.double_stream_modulation_txt(temb)
    single_mod = model.single_stream_modulation(temb)

    hidden_states = model.x_embedder(hidden_states)
    encoder_hidden_states = model.context_embedder(encoder_hidden_states)

    if img_ids.ndim == 3:
        img_ids = img_ids[0]
    if txt_ids.ndim == 3:
        txt_ids = txt_ids[0]
    image_rotary_emb = model.pos_embed(img_ids)
    text_rotary_emb = model.pos_embed(txt_ids)
    rotary = (
        torch.cat([text_rotary_emb[0], image_rotary_emb[0]], dim=0),
        torch.cat([text_rotary_emb[1], image_rotary_emb[1]], dim=0),
    )

    blocks = model.transformer_blocks
    first_in = hidden_states
    encoder_hidden_states, hidden_states = blocks[0](
        hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb_mod_img=double_mod_img,
        temb_mod_txt=double_mod_txt, image_rotary_emb=rotary, joint_attention_kwargs=joint_attention_kwargs)
    first_residual = hidden_states - first_in

    if cache.should_skip(slot, first_residual):
        cache.skipped += 1
        slot.consecutive += 1
        hidden_states = hidden_states + cache.cached_tail(slot)
    else:
        after_first = hidden_states
        for block in blocks[1:]:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                temb_mod_img=double_mod_img, temb_mod_txt=double_mod_txt, image_rotary_emb=rotary,
                joint_attention_kwargs=joint_attention_kwargs)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        for block in model.single_transformer_blocks:
            hidden_states = block(hidden_states=hidden_states, encoder_hidden_states=None, temb_mod=single_mod,
                                  image_rotary_emb=rotary, joint_attention_kwargs=joint_attention_kwargs)
        hidden_states = hidden_states[:, num_txt_tokens:, ...]
        cache.store(slot, first_residual, hidden_states - after_first)

    hidden_states = model.norm_out(hidden_states, temb)
    output = model.proj_out(hidden_states)
    if not return_dict:
        return (output,)
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModelOutput

    return Flux2Transformer2DModelOutput(sample=output)


# ----------------------------------------------------------------------------------------------------
# The per-generation callable
# ----------------------------------------------------------------------------------------------------


class LevelForward:
    """What `Accelerator.forward(level)` returns: call it like the transformer (keyword arguments)."""

    def __init__(self, model, *, stance: str = "default", sdpa_backends: Optional[list] = None,
                 cache: Optional[FirstBlockCache] = None):
        self.model = model
        self.stance = stance
        self.sdpa_backends = sdpa_backends
        self.cache = cache

    def _contexts(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.compiler.set_stance(self.stance))
        if self.sdpa_backends:
            from torch.nn.attention import sdpa_kernel

            stack.enter_context(sdpa_kernel(self.sdpa_backends, set_priority=True))
        return stack

    def __call__(self, **kwargs):
        kwargs.setdefault("return_dict", False)
        with torch.inference_mode(), self._contexts():
            if self.cache is not None:
                return _flux2_forward_cached(self.model, self.cache, **kwargs)
            return self.model(**kwargs)

    def notes(self) -> list[str]:
        """Human-readable notes on what happened during the run (for GenerationResult.logs)."""
        return [self.cache.summary()] if self.cache is not None else []


@dataclass
class _LevelSetup:
    model: Any
    techniques: list[str]
    stance: str
    sdpa_backends: Optional[list]
    cache: Optional[dict]  # FirstBlockCache keyword arguments, None: no block cache


class Accelerator:
    """Builds each level lazily (first use or warm-up) and keeps it; one per loaded transformer.

    Settings (constructor argument, else environment variable, else default):
    compile (KLEINSERVE_COMPILE: on for CUDA, off for CPU), compile_backend (KLEINSERVE_COMPILE_BACKEND,
    "inductor"), fp8 (KLEINSERVE_FP8: on where supported), cache_threshold (KLEINSERVE_CACHE_THRESHOLD,
    0.08), cache_taylor (KLEINSERVE_CACHE_TAYLOR, off).
    """

    RECOMPILE_LIMIT = 64  # the blocks of both classes (and of `high`'s FP8 tree) share one code object

    def __init__(self, transformer, device=None, dtype=None, *, compile: Optional[bool] = None,
                 compile_backend: Optional[str] = None, fp8: Optional[bool] = None,
                 cache_threshold: Optional[float] = None, cache_taylor: Optional[bool] = None):
        self.transformer = transformer
        self.device = torch.device(device) if device is not None else next(transformer.parameters()).device
        self.dtype = dtype if dtype is not None else next(transformer.parameters()).dtype
        if compile is None:
            compile = _env_flag("KLEINSERVE_COMPILE")
        self.compile = self.device.type == "cuda" if compile is None else compile
        self.compile_backend = compile_backend or os.environ.get("KLEINSERVE_COMPILE_BACKEND") or "inductor"
        self.fp8 = _env_flag("KLEINSERVE_FP8") if fp8 is None else fp8  # None: wherever supported
        if cache_threshold is None:
            env = os.environ.get("KLEINSERVE_CACHE_THRESHOLD", "").strip()
            cache_threshold = float(env) if env else DEFAULT_CACHE_THRESHOLD
        self.cache_threshold = cache_threshold
        if cache_taylor is None:
            cache_taylor = bool(_env_flag("KLEINSERVE_CACHE_TAYLOR"))
        self.cache_taylor = cache_taylor
        self._levels: dict[str, _LevelSetup] = {}
        self._compiled: set[int] = set()  # id() of the module trees already compiled
        self._warmed: set[str] = set()
        self._adapter_tree = None  # see adapter_model()
        self._lock = threading.RLock()
        self.build_seconds: dict[str, float] = {}

    # -- building ------------------------------------------------------------------------------------

    def _compile_tree(self, model, techniques: list[str]) -> None:
        if not self.compile:
            techniques.append("regional_compile:skipped(cpu; KLEINSERVE_COMPILE=1 forces it)"
                              if self.device.type == "cpu" else "regional_compile:skipped(KLEINSERVE_COMPILE=0)")
            return
        if id(model) not in self._compiled:
            import torch._dynamo

            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, self.RECOMPILE_LIMIT)
            model.compile_repeated_blocks(fullgraph=True, backend=self.compile_backend)
            self._compiled.add(id(model))
        techniques.append("regional_compile" if self.compile_backend == "inductor"
                          else f"regional_compile({self.compile_backend})")

    def _sdpa(self, techniques: list[str]) -> Optional[list]:
        if self.device.type != "cuda":
            techniques.append(f"sdpa_cudnn:skipped({self.device.type})")
            return None
        from torch.nn.attention import SDPBackend

        techniques.append("sdpa_cudnn")
        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]

    def _shared_clone(self):
        """A new module tree sharing every parameter and buffer with the reference transformer.

        Costs no tensor memory; replacing a Linear's weight in the clone (what torchao's quantize_ does)
        leaves the reference untouched.
        """
        memo: dict[int, Any] = {}
        for t in list(self.transformer.parameters()) + list(self.transformer.buffers()):
            memo[id(t)] = t
        for m in self.transformer.modules():  # compiled calls are bound to the original: do not copy them
            if getattr(m, "_compiled_call_impl", None) is not None:
                memo[id(m._compiled_call_impl)] = None
        clone = copy.deepcopy(self.transformer, memo)
        for m in clone.modules():
            if hasattr(m, "_compiled_call_impl"):
                m._compiled_call_impl = None
        _strip_adapters(clone)
        return clone

    def adapter_model(self):
        """The module tree LoRA adapters are injected into: a clone of the reference sharing every
        weight (no memory but the adapters'), built on first use. Runs eagerly: compiled graphs would
        specialise on each adapter set and scale, and the reference's warm graphs stay untouched."""
        with self._lock:
            if self._adapter_tree is None:
                self._adapter_tree = self._shared_clone()
            return self._adapter_tree

    def _quantize_fp8(self, model, techniques: list[str]) -> None:
        if self.fp8 is False:
            techniques.append("fp8_rowwise:skipped(KLEINSERVE_FP8=0)")
            return
        ok, reason = fp8_support(self.device)
        if not ok:
            techniques.append(f"fp8_rowwise:skipped({reason})")
            return
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=fp8_filter)
        techniques.append("fp8_rowwise")

    def _build(self, level: str) -> _LevelSetup:
        t0 = time.perf_counter()
        techniques: list[str] = []
        if level == "none":
            setup = _LevelSetup(self.transformer, techniques, "force_eager", None, None)
        elif level == "regular":
            self._compile_tree(self.transformer, techniques)
            setup = _LevelSetup(self.transformer, techniques, "default", self._sdpa(techniques), None)
        elif level == "high":
            model = self._shared_clone()
            self._quantize_fp8(model, techniques)
            self._compile_tree(model, techniques)
            sdpa = self._sdpa(techniques)
            cache: dict[str, Any] = dict(threshold=self.cache_threshold, taylor=self.cache_taylor)
            techniques.append(FirstBlockCache(**cache).name)
            setup = _LevelSetup(model, techniques, "default", sdpa, cache)
        else:  # pragma: no cover - _setup checks
            raise ValueError(level)
        self.build_seconds[level] = time.perf_counter() - t0
        log.info("acceleration %s ready in %.1f s: %s", level, self.build_seconds[level], ", ".join(techniques))
        return setup

    def _setup(self, level: str) -> _LevelSetup:
        if level not in LEVELS:
            raise ValueError(f"unknown acceleration level {level!r}; expected one of {LEVELS}")
        with self._lock:
            if level not in self._levels:
                self._levels[level] = self._build(level)
            return self._levels[level]

    # -- public --------------------------------------------------------------------------------------

    def forward(self, level: str, *, adapters: bool = False) -> tuple[LevelForward, list[str]]:
        """(fn, techniques) for one generation at `level`; call again for the next generation (fn holds
        that run's block cache). `techniques` lists what runs, and what was skipped and why.

        adapters: the run uses LoRA adapters: it runs on the adapter tree (`adapter_model`, a clone
        sharing every weight, where the adapters live) eagerly at every level, with the block cache at
        `high` (no FP8: the FP8 tree has no adapters). The reference tree never carries adapters, so
        its compiled blocks stay warm for base requests.

        After `warmup` has compiled a level, its fn runs under the ``eager_on_recompile`` stance: a shape
        the warm-up did not cover runs eagerly (same result, slower) instead of stalling the request on a
        compile.
        """
        if adapters:
            if level not in LEVELS:
                raise ValueError(f"unknown acceleration level {level!r}; expected one of {LEVELS}")
            techniques = ["lora_adapter_tree(eager)"]
            sdpa = self._sdpa(techniques) if level != "none" else None
            cache_kwargs: Optional[dict[str, Any]] = None
            if level == "high":
                cache_kwargs = dict(threshold=self.cache_threshold, taylor=self.cache_taylor)
                techniques += ["fp8_rowwise:skipped(lora)", FirstBlockCache(**cache_kwargs).name]
            return (LevelForward(self.adapter_model(), stance="force_eager", sdpa_backends=sdpa,
                                 cache=FirstBlockCache(**cache_kwargs) if cache_kwargs else None), techniques)
        s = self._setup(level)
        stance = s.stance
        if stance == "default" and level in self._warmed and self.compile:
            stance = "eager_on_recompile"
        cache = FirstBlockCache(**s.cache) if s.cache is not None else None
        return LevelForward(s.model, stance=stance, sdpa_backends=s.sdpa_backends, cache=cache), list(s.techniques)

    def dummy_inputs(self, batch: int, width: int, height: int, text_len: int = 512) -> dict:
        """Transformer kwargs of the shapes a (width, height) generation uses, random values (warm-up)."""
        cfg = self.transformer.config
        h, w = height // 16, width // 16
        g = torch.Generator("cpu").manual_seed(0)
        hidden = torch.randn(batch, h * w, cfg.in_channels, generator=g).to(self.device, self.dtype)
        enc = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g).to(self.device, self.dtype)
        img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
        txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_len))
        return dict(
            hidden_states=hidden, encoder_hidden_states=enc,
            timestep=torch.full((batch,), 0.5, device=self.device, dtype=self.dtype),
            img_ids=img_ids.unsqueeze(0).expand(batch, -1, -1).to(self.device),
            txt_ids=txt_ids.unsqueeze(0).expand(batch, -1, -1).to(self.device),
            guidance=None, joint_attention_kwargs=None, return_dict=False,
        )

    def warmup(self, sizes: Iterable[tuple[int, int]], levels: Sequence[str] = ("regular",),
               batch_sizes: Sequence[int] = (2, 4, 1), text_len: int = 512,
               run_fn: Optional[Callable[[str, int, int, int], Any]] = None) -> dict[str, float]:
        """Build `levels` and run one forward per (level, size, batch) so that compiling happens now.

        Shapes: dynamo compiles the first shape statically, marks the dimensions that change as dynamic
        on the next ones, and batch 1 gets its own graph; so warming 2+ sizes x batches {2, 4, 1} leaves
        graphs that serve every size and batch without recompiling (tests/test_acceleration.py checks it
        with the ``fail_on_recompile`` stance). `run_fn(level, width, height, batch)` replaces the default
        forward on random inputs (`dummy_inputs`). Returns seconds per step of the warm-up.
        """
        sizes = list(sizes)
        report: dict[str, float] = {}
        for level in levels:
            t0 = time.perf_counter()
            self._setup(level)
            report[f"{level}:build"] = time.perf_counter() - t0
            for width, height in sizes:
                for batch in batch_sizes:
                    t0 = time.perf_counter()
                    if run_fn is not None:
                        run_fn(level, width, height, batch)
                    else:
                        fn, _ = self.forward(level)
                        fn.stance = self._levels[level].stance  # compile, even when warmed before
                        fn(**self.dummy_inputs(batch, width, height, text_len))
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    report[f"{level}:{width}x{height}x{batch}"] = time.perf_counter() - t0
            with self._lock:
                self._warmed.add(level)
        return report

    def warmup_presets(self, levels: Optional[Sequence[str]] = None, text_len: int = 512) -> dict[str, float]:
        """Startup warm-up: every preset size (schema.IMAGE_SIZE_PRESETS) at batches 2, 4, 1 for the
        compiled levels (default: regular and high when compiling is on; nothing to do otherwise), so
        the first user request is not the one that compiles."""
        from ..schema import IMAGE_SIZE_PRESETS

        if levels is None:
            levels = ("regular", "high") if self.compile else ()
        if not levels:
            return {}
        return self.warmup(list(IMAGE_SIZE_PRESETS.values()), levels=levels, text_len=text_len)


def _strip_adapters(model: torch.nn.Module) -> None:
    """Replaces every PEFT LoRA layer of `model` by its base layer (a clone made after adapters were
    loaded into the reference transformer must not carry them: their switches live on the reference)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no adapters
        return
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                parent._modules[name] = child.get_base_layer()


def fp8_filter(module: torch.nn.Module, fqn: str) -> bool:
    """The Linear layers FP8 quantizes: those of the repeated blocks (>97% of the transformer's FLOPs)."""
    return isinstance(module, torch.nn.Linear) and fqn.startswith(("transformer_blocks.", "single_transformer_blocks."))
