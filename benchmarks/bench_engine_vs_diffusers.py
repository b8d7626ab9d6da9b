#!/usr/bin/env python
"""Benchmark 1: our engine (acceleration none / regular) vs diffusers' Flux2KleinPipeline, one process.

A mid-size random-weight FLUX.2 [klein] (real layout: 36-layer Qwen3 read at 9/18/27, Flux2 transformer
with 128-dim heads, 32-channel VAE; narrow widths, see _common.MID) is saved as a diffusers folder; the
pipeline and our engine load it from there. Both generate the same images (same prompt, seed, size,
steps, CFG). Timing: one process, warm-up first, then the configurations interleaved round-robin so a
load change on the machine hits all of them alike; the table reports the median wall time, its ratio to
the pipeline, and the same for the process' CPU time (less sensitive to other processes on a shared
machine). Each repeat uses a new prompt, so our prompt-embedding cache only helps where it should (the
empty negative prompt). Peak memory: each configuration runs once more in a fresh subprocess that
reports its peak RSS (VmHWM) and its RSS after imports; tracemalloc cannot see torch's
allocations and a shared process' high-water mark cannot be split between configurations.

    python benchmarks/bench_engine_vs_diffusers.py            # ~3-5 min on 2 CPU cores
    python benchmarks/bench_engine_vs_diffusers.py --compile  # regular with inductor (adds compile time)

Then, unless --no-batching: `regular` with 1, 2 and 4 different requests in one engine run (seconds per
image), what the worker's --batch-images buys on this model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

CONFIGS = ("diffusers", "none", "regular")
PROMPT = "a red fox resting in fresh snow under soft winter light, detailed fur"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--compile", action="store_true", help="regular with torch.compile (KLEINSERVE_COMPILE=1)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-batching", action="store_true",
                   help="skip regular with 1/2/4 different requests per engine run (worker --batch-images)")
    p.add_argument("--folder", help="use/keep the model folder here instead of a temporary one")
    p.add_argument("--json", help="output path (default benchmarks/results/engine_vs_diffusers.json)")
    p.add_argument("--memory-child", choices=CONFIGS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ runners


class Runners:
    """Loads the pipeline and/or the engine from `folder`; `run(config, prompt)` -> (image, info)."""

    def __init__(self, folder: Path, args, configs=CONFIGS):
        import torch

        self.args = args
        self.pipe = self.engine = None
        self.load_seconds = {}
        if "diffusers" in configs:
            from diffusers import Flux2KleinPipeline

            t0 = time.perf_counter()
            self.pipe = Flux2KleinPipeline.from_pretrained(folder, torch_dtype=torch.float32)
            self.pipe.set_progress_bar_config(disable=True)
            self.load_seconds["diffusers"] = time.perf_counter() - t0
        if any(c != "diffusers" for c in configs):
            from kleinserve.engine import load_engine

            t0 = time.perf_counter()
            self.engine = load_engine(str(folder), device="cpu", dtype="float32")
            self.load_seconds["engine"] = time.perf_counter() - t0

    def run(self, config: str, prompt: str):
        import torch

        a = self.args
        if config == "diffusers":
            with torch.inference_mode():
                out = self.pipe(prompt=prompt, width=a.width, height=a.height, num_inference_steps=a.steps,
                                guidance_scale=a.cfg, generator=torch.Generator("cpu").manual_seed(a.seed))
            return out.images[0], {}
        from kleinserve.schema import FluxKleinInput

        request = FluxKleinInput(prompt=prompt, seed=a.seed, image_size={"width": a.width, "height": a.height},
                                 num_inference_steps=a.steps, guidance_scale=a.cfg, acceleration=config,
                                 enable_safety_checker=False, output_format="png")
        result = self.engine.generate(request)
        return result.images[0].data, {"timings": result.timings, "techniques": result.techniques}


def memory_child(args) -> None:
    """Subprocess: RSS after imports, then load + one generation; prints one JSON line."""
    C.quiet_logs()
    import diffusers  # noqa: F401
    import torch  # noqa: F401

    import kleinserve.engine.engine  # noqa: F401

    if args.memory_child == "regular" and args.compile:
        os.environ["KLEINSERVE_COMPILE"] = "1"
    base = C.current_rss_bytes()
    runners = Runners(Path(args.folder), args, configs=(args.memory_child,))
    runners.run(args.memory_child, PROMPT)
    print(json.dumps({"config": args.memory_child, "rss_after_imports": base, "peak_rss": C.maxrss_bytes()}))


def measure_memory(folder: Path, args) -> dict:
    out = {}
    for config in CONFIGS:
        cmd = [sys.executable, __file__, "--memory-child", config, "--folder", str(folder),
               "--width", str(args.width), "--height", str(args.height), "--steps", str(args.steps),
               "--cfg", str(args.cfg), "--seed", str(args.seed)] + (["--compile"] if args.compile else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory subprocess for {config} failed:\n{proc.stderr[-3000:]}")
        out[config] = json.loads(lines[-1])
    return out


# ------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return 0
    C.quiet_logs()
    import torch

    if args.compile:
        os.environ["KLEINSERVE_COMPILE"] = "1"
    env = C.environment()
    t_start = time.perf_counter()
    tmp = None
    if args.folder:
        folder = Path(args.folder)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kleinserve-bench-")
        folder = Path(tmp.name) / "mid-model"
    if not (folder / "model_index.json").is_file():
        t0 = time.perf_counter()
        C.save_model(C.build_components(C.MID, seed=1), folder)
        print(f"built and saved the {C.MID.name} model in {time.perf_counter() - t0:.1f} s: {folder}", flush=True)

    runners = Runners(folder, args)
    transformer = runners.engine.transformer
    params = {"transformer": C.count_params(transformer),
              "text_encoder_full": C.count_params(runners.pipe.text_encoder),
              "text_encoder_run": C.count_params(runners.engine.text.model),
              "vae": C.count_params(runners.engine.vae)}
    flops = C.image_flops(transformer.config, args.width, args.height, args.steps, args.cfg)
    print(f"params: {params}; transformer FLOPs per image {flops / 1e9:.1f} GFLOP; torch threads "
          f"{torch.get_num_threads()}", flush=True)

    # Warm-up (first-call overheads, and compiling when --compile), then interleaved repeats.
    warmup = {}
    images = {}
    for config in CONFIGS:
        t0 = time.perf_counter()
        images[config], _ = runners.run(config, PROMPT)
        warmup[config] = time.perf_counter() - t0
    samples = {c: [] for c in CONFIGS}
    infos = {c: [] for c in CONFIGS}
    cpu_samples = {c: [] for c in CONFIGS}
    for r in range(args.repeats):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[: r % len(CONFIGS)]  # rotate who goes first
        for config in order:
            prompt = f"{PROMPT}, variation {r + 1} for {config}"  # never in the embedding cache
            c0, t0 = time.process_time(), time.perf_counter()
            _, info = runners.run(config, prompt)
            samples[config].append(time.perf_counter() - t0)
            cpu_samples[config].append(time.process_time() - c0)
            infos[config].append(info)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{c} {samples[c][-1]:.2f}s" for c in CONFIGS),
              flush=True)

    memory = None if args.no_memory else measure_memory(folder, args)
    base = C.summarize(samples["diffusers"])["p50"]
    cpu_base = C.summarize(cpu_samples["diffusers"])["p50"]
    rows = []
    for config in CONFIGS:
        s = C.summarize(samples[config])
        cpu = C.summarize(cpu_samples[config])["p50"]
        row = {"config": "diffusers Flux2KleinPipeline" if config == "diffusers" else f"engine {config}",
               "s_per_image": s["p50"], "min": s["min"], "max": s["max"], "speedup": base / s["p50"],
               "cpu_s_per_image": cpu, "cpu_speedup": cpu_base / cpu,
               "warmup_s": warmup[config],
               "psnr_vs_diffusers": None if config == "diffusers" else C.psnr(images[config], images["diffusers"]),
               "max_diff_vs_diffusers": None if config == "diffusers" else C.max_abs_diff(images[config],
                                                                                          images["diffusers"])}
        if infos[config] and infos[config][-1]:
            row["techniques"] = ", ".join(infos[config][-1]["techniques"])
            row["timings_last"] = infos[config][-1]["timings"]
        if memory:
            m = memory[config]
            row["peak_rss_mb"] = m["peak_rss"] / 2**20
            row["rss_over_imports_mb"] = (m["peak_rss"] - m["rss_after_imports"]) / 2**20
        rows.append(row)
    if memory:
        ref = rows[0]["rss_over_imports_mb"]
        for row in rows:
            row["memory_ratio"] = row["rss_over_imports_mb"] / ref

    title = (f"Engine vs diffusers: {C.MID.name}, {args.width}x{args.height}, {args.steps} steps, CFG {args.cfg:g}, "
             f"float32 CPU, {args.repeats} repeats (median)")
    columns = [("config", "configuration", ""), ("s_per_image", "s/image", ".2f"),
               ("speedup", "speed vs diffusers", ".2f"), ("min", "min s", ".2f"), ("max", "max s", ".2f"),
               ("cpu_s_per_image", "CPU s/image", ".2f"), ("cpu_speedup", "CPU-time vs diffusers", ".2f")]
    if memory:
        columns += [("peak_rss_mb", "peak RSS MiB", ".0f"), ("rss_over_imports_mb", "RSS over imports MiB", ".0f"),
                    ("memory_ratio", "memory vs diffusers", ".2f")]
    columns += [("psnr_vs_diffusers", "PSNR vs diffusers dB", ".1f")]
    table = C.print_table(title, rows, columns)
    for row in rows:
        if row.get("techniques"):
            print(f"  {row['config']}: {row['techniques']}")
    batching = None
    if not args.no_batching:
        from kleinserve.schema import FluxKleinInput

        def request(k):
            return FluxKleinInput(prompt=f"{PROMPT}, batched {k}", seed=args.seed + k, acceleration="regular",
                                  image_size={"width": args.width, "height": args.height},
                                  num_inference_steps=args.steps, guidance_scale=args.cfg,
                                  enable_safety_checker=False)

        batching = C.measure_request_batching(runners.engine, request, repeats=args.repeats)
        table += "\n" + C.print_table("engine regular: requests per engine run (worker --batch-images)", batching,
                                      C.BATCHING_COLUMNS)
    payload = {"benchmark": "engine_vs_diffusers", "environment": env, "model": C.MID, "params": params,
               "settings": vars(args), "transformer_flops_per_image": flops, "load_seconds": runners.load_seconds,
               "rows": rows, "samples": samples, "cpu_samples": cpu_samples, "memory": memory, "batching": batching,
               "table": table,
               "wall_seconds": time.perf_counter() - t_start}
    path = C.write_json("engine_vs_diffusers", payload, args.json)
    print(f"\nwrote {path} ({time.perf_counter() - t_start:.0f} s in all)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
