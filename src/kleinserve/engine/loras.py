"""LoRA adapters, hot-swapped per request; the model that serves requests without LoRAs never changes.

    adapters = LoraAdapters(accelerator.adapter_model, max_loaded=8)
    notes = adapters.activate([LoraFile(file, scale, name), ...])   # before a LoRA run; [] -> none

A file is read by diffusers' `Flux2LoraLoaderMixin.lora_state_dict` -- the converter that understands
diffusers/PEFT, kohya/ComfyUI (`lora_down`/`lora_up`/`alpha`), BFL/ai-toolkit (`diffusion_model.`), and
LyCORIS/LoKr layouts -- and injected as a PEFT adapter with `load_lora_into_transformer`, exactly as
`pipeline.load_lora_weights` does. The adapters live in the Accelerator's adapter tree: a clone of the
transformer that shares every weight (so it costs only the adapters' memory). Runs with LoRAs use that
tree; runs without use the reference tree, which never carries a PEFT layer -- base images stay exactly
what they were, and the reference's compiled blocks stay warm. Loaded adapters stay in memory (least
recently used dropped beyond `max_loaded`); each LoRA run activates its own set with its scales
(`set_adapters`).

The adapters run unfused (base + scale * B(A x) per layer): fusing would save those two thin matmuls per
adapted Linear but rewrite the shared base weights per request; see docs/PERFORMANCE.md.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from .types import LoraFile, LoraFormatError

log = logging.getLogger(__name__)

DEFAULT_MAX_LOADED = 8


def _file_key(path: Path) -> tuple:
    """Which loaded adapter a file is: its path, inode and size. Not its mtime: the service's download
    cache touches files to mark them recently used; files are replaced (new inode), not rewritten."""
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size)


class LoraAdapters:
    """`model`: the transformer the adapters go into, or a callable giving it on first use (the
    Accelerator's adapter tree: a weight-sharing clone, so the reference model never changes)."""

    def __init__(self, model, *, max_loaded: int = DEFAULT_MAX_LOADED):
        self._model = model
        self._transformer = None
        self.max_loaded = max(1, int(max_loaded))
        self._loaded: OrderedDict[tuple, str] = OrderedDict()  # file key -> adapter name (LRU order)
        self._counter = 0
        self._lock = threading.RLock()
        self.before_first_load = None  # callable run once before the first adapter is injected

    @property
    def transformer(self):
        if self._transformer is None:
            self._transformer = self._model() if callable(self._model) and not isinstance(
                self._model, torch.nn.Module) else self._model
        return self._transformer

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded.values())

    def activate(self, loras: Sequence[LoraFile]) -> list[str]:
        """Makes exactly `loras` (with their scales) active; none: the base model. Returns log notes."""
        with self._lock:
            if not loras:
                # Always (not only after a LoRA run): a failed load may have left layers switched on.
                if self._transformer is not None and getattr(self._transformer, "_hf_peft_config_loaded", False):
                    self._transformer.disable_adapters()
                return []
            merged: OrderedDict[tuple, list] = OrderedDict()  # the same file twice: scales add up
            for lora in loras:
                key = _file_key(Path(lora.file))
                if key in merged:
                    merged[key][1] += float(lora.scale)
                else:
                    merged[key] = [lora, float(lora.scale)]
            names, scales, notes = [], [], []
            for key, (lora, scale) in merged.items():
                name, loaded_now = self._ensure_loaded(key, lora, keep=set(merged))
                names.append(name)
                scales.append(scale)
                notes.append(f"LoRA {lora.name} (scale {scale:g}): "
                             f"{'loaded' if loaded_now else 'already in memory'} as adapter {name}")
            self.transformer.set_adapters(names, weights=scales)
            self.transformer.enable_adapters()
            return notes

    def _ensure_loaded(self, key: tuple, lora: LoraFile, keep: set) -> tuple[str, bool]:
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key], False
        while len(self._loaded) >= self.max_loaded:
            old = next((k for k in self._loaded if k not in keep), None)
            if old is None:
                break
            self.transformer.delete_adapters(self._loaded.pop(old))
        self._counter += 1
        name = f"lora_{self._counter}"
        if self.before_first_load is not None:
            hook, self.before_first_load = self.before_first_load, None
            hook()
        self._load(Path(lora.file), name, lora.name)
        self._loaded[key] = name
        return name, True

    def _load(self, file: Path, adapter_name: str, label: str) -> None:
        from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin

        try:
            state_dict, metadata = Flux2LoraLoaderMixin.lora_state_dict(
                str(file), use_safetensors=True, return_lora_metadata=True)
        except Exception as exc:  # noqa: BLE001 - a file the converters choke on is the user's file
            raise LoraFormatError(f"{label}: not a LoRA file diffusers' FLUX.2 converters understand "
                                  f"({type(exc).__name__}: {_first_line(exc)})") from None
        if not state_dict:
            raise LoraFormatError(f"{label}: the file holds no tensors")
        odd = [k for k in state_dict if "lora" not in k and "lokr" not in k]
        if odd:
            raise LoraFormatError(f"{label}: not a LoRA or LoKr file (e.g. key {odd[0]!r}); accepted: diffusers/"
                                  "PEFT, kohya/ComfyUI, BFL/ai-toolkit and LyCORIS LoKr layouts")
        if not any(k.startswith("transformer.") for k in state_dict):
            raise LoraFormatError(f"{label}: no keys for the FLUX.2 transformer (e.g. {next(iter(state_dict))!r}); "
                                  "is it a LoRA for another model?")
        before = set(getattr(self.transformer, "peft_config", {}) or {})
        try:
            with warnings.catch_warnings():  # "Already found a `peft_config`": several adapters is the point
                warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
                Flux2LoraLoaderMixin.load_lora_into_transformer(
                    state_dict, transformer=self.transformer, adapter_name=adapter_name, metadata=metadata)
        except Exception as exc:  # noqa: BLE001 - shape mismatch (a LoRA for another size), bad ranks, ...
            self._drop(adapter_name)
            raise LoraFormatError(f"{label}: does not fit this model ({type(exc).__name__}: "
                                  f"{_first_line(exc)})") from None
        if adapter_name not in (set(getattr(self.transformer, "peft_config", {}) or {}) - before):
            raise LoraFormatError(f"{label}: none of its keys name a layer of this model's transformer")
        log.info("LoRA %s loaded as adapter %s (%d tensors)", label, adapter_name, len(state_dict))

    def _drop(self, adapter_name: str) -> None:
        try:
            if adapter_name in (getattr(self.transformer, "peft_config", {}) or {}):
                self.transformer.delete_adapters(adapter_name)
        except Exception:  # noqa: BLE001 - best effort after a failed load
            log.exception("could not remove the half-loaded adapter %s", adapter_name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:300]
