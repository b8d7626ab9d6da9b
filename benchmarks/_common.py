"""Shared pieces of the benchmark scripts: model sizes, random-weight builders, metrics, tables, JSON.

Benchmarks are scripts, not tests: they print a table and write JSON under benchmarks/results/.
On a CPU machine compare ratios measured in one run, never absolute seconds across runs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s, H100 SXM
H100_FP8_PEAK = 1979e12


# ------------------------------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class ModelSize:
    """Widths and depths of the three networks; everything else is FLUX.2 [klein]'s real layout."""

    name: str
    heads: int  # transformer: heads x head_dim = hidden
    head_dim: int
    double_blocks: int
    single_blocks: int
    axes_dims_rope: tuple = (32, 32, 32, 32)
    text_hidden: int = 4096  # Qwen3
    text_layers: int = 36
    text_intermediate: int = 12288
    text_heads: int = 32
    text_kv_heads: int = 8
    text_head_dim: int = 128
    text_vocab: Optional[int] = None  # None: the (tiny) tokenizer's size
    vae_channels: tuple = (128, 256, 512, 512)
    vae_layers_per_block: int = 2
    vae_norm_groups: int = 32

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


# FLUX.2 [klein] 9B base: 8 double + 24 single blocks, 32 x 128, Qwen3-8B (36 layers, 4096, vocab 151936).
FULL = ModelSize("klein-9b (random weights)", heads=32, head_dim=128, double_blocks=8, single_blocks=24,
                 text_vocab=151936)
# Mid size for CPU: big enough that the transformer dominates, small enough for 2 cores.
MID = ModelSize("mid (random weights)", heads=2, head_dim=128, double_blocks=2, single_blocks=4,
                text_hidden=256, text_layers=36, text_intermediate=768, text_heads=4, text_kv_heads=2,
                text_head_dim=64, vae_channels=(32, 64, 64, 64), vae_layers_per_block=1, vae_norm_groups=8)
# For --tiny smoke runs of bench_gpu.py on CPU.
SMOKE = ModelSize("smoke (random weights)", heads=2, head_dim=16, double_blocks=1, single_blocks=2,
                  axes_dims_rope=(4, 4, 4, 4), text_hidden=32, text_layers=28, text_intermediate=64,
                  text_heads=2, text_kv_heads=1, text_head_dim=16, vae_channels=(8, 8, 8, 8),
                  vae_layers_per_block=1, vae_norm_groups=4)

TEXT_LAYERS_READ = (9, 18, 27)
TEXT_TOKENS = 512


def build_components(size: ModelSize, *, device="cpu", dtype=None, seed: int = 0) -> dict:
    """The five Flux2KleinPipeline components with random weights, built directly on `device` in
    `dtype` (no float32 copy of a 9B model, no disk)."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from kleinserve.engine import tiny

    dtype = dtype or torch.float32
    tokenizer = tiny.build_tokenizer()
    vocab = size.text_vocab or ((len(tokenizer) + 63) // 64) * 64
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            text_encoder = Qwen3ForCausalLM(Qwen3Config(
                vocab_size=vocab, hidden_size=size.text_hidden, intermediate_size=size.text_intermediate,
                num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
                num_key_value_heads=size.text_kv_heads, head_dim=size.text_head_dim,
                max_position_embeddings=40960, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                tie_word_embeddings=False, pad_token_id=0,
            ))
            torch.manual_seed(seed + 1)
            transformer = Flux2Transformer2DModel(
                patch_size=1, in_channels=128, num_layers=size.double_blocks,
                num_single_layers=size.single_blocks, attention_head_dim=size.head_dim,
                num_attention_heads=size.heads, joint_attention_dim=len(TEXT_LAYERS_READ) * size.text_hidden,
                timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=size.axes_dims_rope,
                rope_theta=2000, eps=1e-6, guidance_embeds=False,
            )
            torch.manual_seed(seed + 2)
            vae = AutoencoderKLFlux2(
                block_out_channels=size.vae_channels, layers_per_block=size.vae_layers_per_block,
                latent_channels=32, norm_num_groups=size.vae_norm_groups, patch_size=(2, 2),
            )
    finally:
        torch.set_default_dtype(previous)
    for m in (text_encoder, transformer, vae):
        m.eval().requires_grad_(False)
    return {"scheduler": tiny.build_scheduler(), "vae": vae, "text_encoder": text_encoder,
            "tokenizer": tokenizer, "transformer": transformer}


def save_model(components: dict, folder: Path) -> Path:
    from diffusers import Flux2KleinPipeline

    Flux2KleinPipeline(**components, is_distilled=False).save_pretrained(folder)
    return folder


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------ FLOPs


def transformer_flops(cfg, width: int, height: int, text_tokens: int = TEXT_TOKENS) -> float:
    """FLOPs of one transformer forward (batch 1): Linear layers of the blocks + attention.

    Per token, a double-stream block applies (4 + 3*mlp_ratio) d^2 weights (its image and text halves
    each see only their own tokens) and a single-stream block the same; attention adds 4 S^2 d per block.
    For klein 9B at 1024x768 (S = 3072 + 512): 50.0 + 6.7 = 56.8 TFLOP (docs/PERFORMANCE.md).
    """
    d = cfg.num_attention_heads * cfg.attention_head_dim
    blocks = cfg.num_layers + cfg.num_single_layers
    s = (width // 16) * (height // 16) + text_tokens
    linear = 2 * (4 + 3 * cfg.mlp_ratio) * d * d * blocks * s
    attention = 4 * s * s * d * blocks
    return float(linear + attention)


def image_flops(cfg, width: int, height: int, steps: int, cfg_scale: float, text_tokens: int = TEXT_TOKENS) -> float:
    return transformer_flops(cfg, width, height, text_tokens) * steps * (2 if cfg_scale > 1 else 1)


# ------------------------------------------------------------------------------------------ metrics


def to_array(image) -> np.ndarray:
    """PIL image, PNG/JPEG bytes or array -> float64 HxWx3 in [0, 255]."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float64)


def psnr(a, b) -> float:
    a, b = to_array(a), to_array(b)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a, b, window: int = 8) -> float:
    """Mean SSIM over non-overlapping window x window tiles of the luma (a cheap, dependency-free SSIM)."""
    def luma(x):
        x = to_array(x)
        return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]

    ya, yb = luma(a), luma(b)
    h, w = (ya.shape[0] // window) * window, (ya.shape[1] // window) * window
    if h == 0 or w == 0:
        return float("nan")

    def tiles(y):
        return y[:h, :w].reshape(h // window, window, w // window, window).transpose(0, 2, 1, 3).reshape(
            -1, window * window)

    ta, tb = tiles(ya), tiles(yb)
    ma, mb = ta.mean(1), tb.mean(1)
    va, vb = ta.var(1), tb.var(1)
    cov = ((ta - ma[:, None]) * (tb - mb[:, None])).mean(1)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return float(s.mean())


def max_abs_diff(a, b) -> float:
    return float(np.abs(to_array(a) - to_array(b)).max())


def summarize(samples: Sequence[float]) -> dict:
    xs = sorted(samples)
    if not xs:
        return {"n": 0}

    def pct(p):
        k = (len(xs) - 1) * p
        lo, hi = int(np.floor(k)), int(np.ceil(k))
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"n": len(xs), "min": xs[0], "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": xs[-1],
            "mean": statistics.fmean(xs)}


# ------------------------------------------------------------------------------------------ memory


def maxrss_bytes() -> int:
    """Peak resident set size of this process image so far.

    VmHWM from /proc (Linux): getrusage's ru_maxrss survives fork + exec, so a subprocess started by a
    big parent would report at least the parent's size."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------------ output


def environment() -> dict:
    import torch

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    with contextlib.suppress(Exception):
        env["load_average_at_start"] = os.getloadavg()
    with contextlib.suppress(Exception):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    for name in ("diffusers", "transformers", "torchao", "fastapi", "uvicorn", "httpx"):
        with contextlib.suppress(Exception):
            module = __import__(name)
            env[name] = module.__version__
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        with contextlib.suppress(Exception):
            env["cudnn"] = torch.backends.cudnn.version()
    return env


def write_json(name: str, payload: dict, path: Optional[str] = None) -> Path:
    out = Path(path) if path else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return out


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == float("inf"):
            return "inf"
        return format(value, spec)
    return str(value)


def print_table(title: str, rows: Iterable[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec). Prints a Markdown table (pastes into BENCHMARKS.md)."""
    rows = list(rows)
    header = [h for _, h, _ in columns]
    body = [[fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = [f"\n{title}\n",
             "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) + " |" for b in body]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


class Timer:
    def __init__(self, sync: Optional[Callable[[], None]] = None):
        self.sync = sync
        self.seconds = 0.0

    def __enter__(self):
        if self.sync:
            self.sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.sync:
            self.sync()
        self.seconds = time.perf_counter() - self._t0
        return False


def quiet_logs() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    with contextlib.suppress(Exception):
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()


def measure_request_batching(engine, make_request: Callable[[int], Any], counts: Sequence[int] = (1, 2, 4),
                             repeats: int = 2, sync: Optional[Callable[[], None]] = None) -> list[dict]:
    """Seconds per image with n different requests (`make_request(k)`: own prompt and seed) in one
    `engine.generate_batch` run, for each n in `counts` (what the worker does with --batch-images).
    One untimed run per n first; rows carry the transformer batch and the speed-up over n = 1."""
    from kleinserve.engine import GenerationTask

    rows = []
    for n in counts:
        tasks = [GenerationTask(make_request(k)) for k in range(n)]
        engine.generate_batch(tasks)
        seconds = []
        for _ in range(max(1, repeats)):
            with Timer(sync) as t:
                engine.generate_batch(tasks)
            seconds.append(t.seconds / n)
        branches = 2 if tasks[0].request.uses_cfg else 1
        rows.append({"requests_per_run": n, "transformer_batch": n * branches,
                     "s_per_image": summarize(seconds)["p50"]})
    for row in rows:
        row["speedup_vs_1"] = rows[0]["s_per_image"] / row["s_per_image"]
    return rows


BATCHING_COLUMNS = [("requests_per_run", "requests/run", ""), ("transformer_batch", "transformer batch", ""),
                    ("s_per_image", "s/image", ".3f"), ("speedup_vs_1", "vs 1 request", ".2f")]
