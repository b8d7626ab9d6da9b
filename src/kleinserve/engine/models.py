"""Model specs: which weights to serve, and loading them onto a device.

A spec is one of
- `auto`: the real model (`black-forest-labs/FLUX.2-klein-base-9B`) when CUDA is available, else `tiny`;
- `tiny`: the in-process random model of `tiny.py` (announced loudly: it is NOT FLUX.2);
- a local folder in diffusers layout (`model_index.json`, `transformer/`, `vae/`, `text_encoder/`,
  `tokenizer/`, `scheduler/`), e.g. what `hf download` or `save_pretrained` writes;
- a Hugging Face repo id (`org/name`), downloaded with huggingface_hub (progress bars on stderr,
  `HF_HUB_OFFLINE=1` respected). Only the text-encoder shards holding layers 0..26 are fetched where
  the checkpoint's index allows it: the rest of Qwen3 and its LM head are never used.

Every failure becomes `ModelUnavailable` with a message that says what to do.
"""

from __future__ import annotations

import json
import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .text import OUT_LAYERS
from .tiny import TINY_MARKER
from .types import ModelInfo, ModelUnavailable

log = logging.getLogger("kleinserve.engine")

DEFAULT_REPO_ID = "black-forest-labs/FLUX.2-klein-base-9B"
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

TINY_BANNER = """
************************************************************************************
*  WARNING: the TINY RANDOM model (`tiny`): small random weights built in-process,  *
*  NOT FLUX.2 [klein]. Images are noise-like test patterns, for development and     *
*  tests only. Pass --model black-forest-labs/FLUX.2-klein-base-9B (or a local      *
*  diffusers folder) on a CUDA machine for real images.                             *
************************************************************************************"""

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass
class Components:
    """The five pipeline components, on their devices, plus where they came from."""

    transformer: Any
    vae: Any
    text_encoder: Any  # Qwen3ForCausalLM (tiny) or a truncated Qwen3Model (loaded)
    tokenizer: Any
    scheduler: Any
    info: ModelInfo
    model_id: str  # key of the embedding cache
    extras: dict = field(default_factory=dict)


def set_threads(n: int) -> None:
    """CPU threads for this process's torch (several worker processes on one box share the cores)."""
    torch.set_num_threads(max(1, int(n)))
    try:
        torch.set_num_interop_threads(max(1, min(2, int(n))))
    except RuntimeError:  # only settable before the first parallel work; harmless to keep the default
        pass


def cuda_device_count() -> int:
    """How many CUDA devices this process sees (`serve --devices all` starts one worker per device)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable(f"device {device!r} asked for, but CUDA is not available: use --device cpu")
    return dev


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """bf16 on CUDA, float32 elsewhere, unless overridden ("bf16", "fp16", "fp32" or a torch.dtype)."""
    if dtype is None or str(dtype) == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of bf16, fp16, fp32")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_spec(spec: Optional[str], *, repo_id: str = DEFAULT_REPO_ID, distilled: bool = False) -> str:
    """`auto` -> the real repo id (`repo_id`: a klein family's checkpoint) when CUDA is available,
    else `tiny` (`tiny-distilled` for a distilled family); other specs unchanged."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        return repo_id if torch.cuda.is_available() else ("tiny-distilled" if distilled else "tiny")
    return spec


def load_components(
    spec: Optional[str] = "auto",
    *,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
    cpu_offload: bool = False,
) -> Components:
    """Resolve `spec` and load its components. Raises `ModelUnavailable` with what to do."""
    t0 = time.perf_counter()
    asked = spec or "auto"
    resolved = resolve_spec(asked)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)

    folder = None
    distilled = False
    if resolved in ("tiny", "tiny-distilled"):
        from .tiny import build_tiny_components

        distilled = resolved == "tiny-distilled"
        parts = build_tiny_components(distilled)
        source, is_tiny, model_id = resolved, True, resolved
    else:
        folder = _local_folder(resolved)
        source = str(folder.resolve()) if folder is not None else resolved  # a folder, or the repo id
        if folder is None:
            folder = download_repo(resolved)
        parts = load_folder(folder, dt)
        is_tiny = (folder / TINY_MARKER).is_file()
        model_id = f"{source}@{folder.resolve()}"
        distilled = _is_distilled(folder)

    try:
        _place(parts["transformer"], dev, dt)
        _place(parts["vae"], dev, dt)
        _place(parts["text_encoder"], torch.device("cpu") if cpu_offload else dev, dt)
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelUnavailable(
            f"not enough GPU memory on {dev} for {source} in {dtype_name(dt)}"
            + ("" if cpu_offload else ": retry with CPU offload of the text encoder (--cpu-offload), "
               "which fits 24 GB cards")
        ) from exc

    info = ModelInfo(
        spec=asked,
        source=source,
        is_tiny=is_tiny,
        device=str(dev),
        dtype=dtype_name(dt),
        load_seconds=round(time.perf_counter() - t0, 3),
        distilled=distilled,
    )
    if is_tiny:
        log.warning(TINY_BANNER)
    else:
        log.info("loaded %s on %s (%s) in %.1fs", source, info.device, info.dtype, info.load_seconds)
    return Components(info=info, model_id=model_id, extras={"folder": folder}, **parts)


def _is_distilled(folder: Path) -> bool:
    """model_index.json's `is_distilled` (the distilled klein checkpoints: 4 steps, no CFG)."""
    try:
        return bool(json.loads((folder / "model_index.json").read_text()).get("is_distilled", False))
    except (OSError, ValueError):
        return False


def _place(module, device: torch.device, dtype: torch.dtype) -> None:
    """Move to device, cast only when needed (casting a model to its own dtype makes diffusers warn)."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    module.to(device=device)
    module.eval().requires_grad_(False)


def _local_folder(spec: str) -> Optional[Path]:
    """The folder a spec names; None for a repo id; ModelUnavailable for a path that does not exist."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelUnavailable(f"model spec {spec!r} is a file, not a folder: point --model at a "
                               "diffusers-layout checkpoint folder (with transformer/, vae/, ...)")
    if _REPO_ID.match(spec):
        return None
    raise ModelUnavailable(
        f"model folder {spec!r} does not exist: pass an existing diffusers-layout folder, a Hugging "
        f"Face repo id such as {DEFAULT_REPO_ID}, `tiny` or `auto`"
    )


def check_folder(folder: Path) -> None:
    for sub in SUBFOLDERS:
        if not (folder / sub).is_dir():
            raise ModelUnavailable(
                f"folder {folder} has no {sub}/ subfolder: point --model at a diffusers-layout checkpoint "
                f"(the folder holding model_index.json and {', '.join(s + '/' for s in SUBFOLDERS)}), e.g. "
                f"`hf download {DEFAULT_REPO_ID} --local-dir DIR` then --model DIR"
            )


def load_folder(folder: Path, dtype: torch.dtype) -> dict:
    """Load each component with its class's from_pretrained; the text encoder without unused layers."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3Model

    check_folder(folder)
    step = "transformer"
    try:
        transformer = Flux2Transformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=dtype)
        step = "vae"
        vae = AutoencoderKLFlux2.from_pretrained(folder, subfolder="vae", dtype=dtype)
        step = "text_encoder"
        te_dir = folder / "text_encoder"
        config = Qwen3Config.from_pretrained(te_dir)
        deepest = max(OUT_LAYERS)
        if config.num_hidden_layers > deepest:  # never build, load or run layers past the deepest read
            config.num_hidden_layers = deepest
            if getattr(config, "layer_types", None):
                config.layer_types = list(config.layer_types)[:deepest]
        with _quiet_transformers():  # its load report lists the skipped layers and LM head: expected
            text_encoder = Qwen3Model.from_pretrained(te_dir, config=config, dtype=dtype)
        step = "tokenizer"
        tokenizer = Qwen2TokenizerFast.from_pretrained(folder / "tokenizer")
        step = "scheduler"
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    except ModelUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - any loading failure is reported with what to do
        raise ModelUnavailable(
            f"cannot load {step}/ from {folder}: {type(exc).__name__}: {exc}. The folder must be a complete "
            f"diffusers-layout FLUX.2 [klein] checkpoint; re-download it with "
            f"`hf download {DEFAULT_REPO_ID} --local-dir {folder}`"
        ) from exc
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
            "tokenizer": tokenizer, "scheduler": scheduler}


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# Everything the engine reads, except the text encoder's weight shards (chosen from its index).
_BASE_PATTERNS = [
    "model_index.json",
    "transformer/*",
    "vae/*",
    "scheduler/*",
    "tokenizer/*",
    "text_encoder/*.json",
]


def needed_text_encoder_shards(index: dict, deepest: int = max(OUT_LAYERS)) -> set[str]:
    """Shard files holding a weight the truncated encoder loads (not the LM head, not layers >= deepest)."""
    needed = set()
    for name, shard in index.get("weight_map", {}).items():
        if name.startswith("lm_head."):
            continue
        m = re.search(r"\blayers\.(\d+)\.", name)
        if m and int(m.group(1)) >= deepest:
            continue
        needed.add(shard)
    return needed


def download_repo(repo_id: str) -> Path:
    """snapshot_download the parts the engine needs; ModelUnavailable (with what to do) on failure."""
    from huggingface_hub import constants, snapshot_download

    offline = bool(constants.HF_HUB_OFFLINE)  # HF_HUB_OFFLINE=1, read by huggingface_hub
    hint = (
        f"download the weights where the hub is reachable with `hf download {repo_id} "
        f"--local-dir DIR` and pass --model DIR"
    )
    try:
        log.info("fetching %s from the Hugging Face hub%s", repo_id, " (offline: cache only)" if offline else "")
        folder = Path(snapshot_download(repo_id, allow_patterns=_BASE_PATTERNS))
        index_file = folder / "text_encoder" / "model.safetensors.index.json"
        if index_file.is_file():
            shards = needed_text_encoder_shards(json.loads(index_file.read_text()))
            patterns = [f"text_encoder/{s}" for s in sorted(shards)]
        else:
            patterns = ["text_encoder/*.safetensors"]
        folder = Path(snapshot_download(repo_id, allow_patterns=_BASE_PATTERNS + patterns))
    except Exception as exc:  # noqa: BLE001
        name = type(exc).__name__
        if "Gated" in name or "401" in str(exc) or "403" in str(exc):
            raise ModelUnavailable(
                f"{repo_id} is gated: accept its licence on https://huggingface.co/{repo_id} and log in "
                f"(`hf auth login` or HF_TOKEN), or {hint}"
            ) from exc
        if "RepositoryNotFound" in name:
            raise ModelUnavailable(f"no Hugging Face repo {repo_id!r} (or it is private), and no local "
                                   f"folder of that name: check the spec, or pass an existing "
                                   f"diffusers-layout folder") from exc
        if offline:
            raise ModelUnavailable(
                f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: unset "
                f"HF_HUB_OFFLINE to download it, or {hint}"
            ) from exc
        raise ModelUnavailable(f"cannot reach the Hugging Face hub for {repo_id} ({name}: {exc}): {hint}") from exc
    return folder
