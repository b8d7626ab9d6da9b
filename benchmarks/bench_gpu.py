#!/usr/bin/env python
"""Benchmark 3 (GPU): full-size random-weight FLUX.2 [klein] 9B, bf16, 1024x768, 28 steps, CFG 5.

One command measures diffusers' Flux2KleinPipeline and our engine at acceleration none / regular / high:
seconds per image, model FLOP utilisation (transformer FLOPs per image / time / 989 TFLOP/s, the H100
dense bf16 peak; 3.18 PFLOP per image at 1024x768), peak GPU memory, cold start (building the model on
the GPU + compiling / quantizing at warm-up), and the image distance of each level to `none` (PSNR, SSIM)
next to the bf16 noise floor (none vs diffusers: two eager bf16 implementations of the same math that
differ only in how cond/uncond are batched). With --batching it also measures `regular` with 1, 2 and 4
requests in one engine run (`Engine.generate_batch`, what the worker does with --batch-images).

Weights are random (built directly on the GPU in bf16, nothing read from disk): timings match the real
model (same shapes and kernels); images are noise. The text encoder is Qwen3-8B-sized.

    python benchmarks/bench_gpu.py                       # needs CUDA; ~6-10 min on one H100
    python benchmarks/bench_gpu.py --batching --warm-presets
    python benchmarks/bench_gpu.py --tiny                # CPU smoke run of this script (not GPU figures)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import _common as C

LEVELS = ("none", "regular", "high")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--levels", default="diffusers,none,regular,high",
                   help="comma-separated subset of diffusers,none,regular,high")
    p.add_argument("--batching", action="store_true", help="also regular with 1/2/4 requests per engine run")
    p.add_argument("--warm-presets", action="store_true",
                   help="also time the startup warm-up of all six preset sizes (regular and high)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny model (checks the script)")
    p.add_argument("--json", help="output path (default benchmarks/results/gpu.json, gpu_smoke.json with --tiny)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU and found none (torch "
              f"{torch.__version__}, CUDA available: False).\nThe CPU figures come from "
              "benchmarks/bench_engine_vs_diffusers.py and benchmarks/bench_service.py; "
              "`bench_gpu.py --tiny` smoke-tests this script on CPU.", file=sys.stderr)
        return 2
    C.quiet_logs()
    wanted = [x.strip() for x in args.levels.split(",") if x.strip()]
    unknown = set(wanted) - {"diffusers", *LEVELS}
    if unknown:
        print(f"unknown --levels entries: {sorted(unknown)}", file=sys.stderr)
        return 2
    if args.tiny:
        size, device, dtype = C.SMOKE, torch.device("cpu"), torch.float32
        args.width, args.height = min(args.width, 128), min(args.height, 96)
        args.steps, args.repeats = min(args.steps, 4), min(args.repeats, 1)
    else:
        size, device, dtype = C.FULL, torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def reset_peak():
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib():
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    env = C.environment()
    t_start = time.perf_counter()
    with C.Timer(sync) as t_build:
        components = C.build_components(size, device=device, dtype=dtype, seed=1)
    transformer = components["transformer"]
    params = {k: C.count_params(components[k]) for k in ("transformer", "text_encoder", "vae")}
    flops = C.image_flops(transformer.config, args.width, args.height, args.steps, args.cfg)
    print(f"built {size.name} on {device} in {t_build.seconds:.1f} s: {params}; "
          f"{flops / 1e15:.3f} PFLOP per image", flush=True)

    rows, images, extra = [], {}, {}

    def add_row(name, seconds, peak, first=None, warmup=None, techniques=None, timings=None, notes=None):
        s = C.summarize(seconds)
        row = {"config": name, "s_per_image": s["p50"], "min": s["min"], "max": s["max"],
               "mfu": flops / s["p50"] / C.H100_BF16_PEAK, "peak_gib": peak, "first_s": first,
               "warmup_s": warmup, "samples": seconds}
        if techniques is not None:
            row["techniques"] = ", ".join(techniques)
        if timings is not None:
            row["timings"] = timings
        if notes:
            row["notes"] = notes
        rows.append(row)
        print(f"{name}: {s['p50']:.3f} s/image (MFU {row['mfu']:.1%}), peak {C.fmt(peak, '.1f')} GiB", flush=True)
        return row

    # ---------------------------------------------------------------- diffusers' pipeline (eager bf16)
    if "diffusers" in wanted:
        from diffusers import Flux2KleinPipeline

        pipe = Flux2KleinPipeline(**components, is_distilled=False)
        pipe.set_progress_bar_config(disable=True)

        def run_pipe():
            with torch.inference_mode():
                return pipe(prompt=C_PROMPT, width=args.width, height=args.height, num_inference_steps=args.steps,
                            guidance_scale=args.cfg, generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]

        reset_peak()
        with C.Timer(sync) as first:
            run_pipe()
        seconds = []
        for _ in range(args.repeats):
            with C.Timer(sync) as t:
                images["diffusers"] = run_pipe()
            seconds.append(t.seconds)
        add_row("diffusers Flux2KleinPipeline (eager)", seconds, peak_gib(), first=first.seconds)
        del pipe
        gc.collect()

    # ---------------------------------------------------------------- our engine
    from kleinserve.engine.engine import Engine
    from kleinserve.engine.models import Components
    from kleinserve.engine.types import ModelInfo
    from kleinserve.schema import FluxKleinInput

    info = ModelInfo(spec="bench", source=size.name, is_tiny=False, device=str(device),
                     dtype=str(dtype).removeprefix("torch."), load_seconds=t_build.seconds)
    engine = Engine(Components(info=info, model_id="bench", extras={"folder": None}, **components))
    components = None  # the engine truncated the text encoder in place; drop the pipeline's references
    gc.collect()

    def request(level, num_images=1, seed=args.seed, prompt=C_PROMPT):
        return FluxKleinInput(prompt=prompt, seed=seed, acceleration=level, num_images=num_images,
                              image_size={"width": args.width, "height": args.height},
                              num_inference_steps=args.steps, guidance_scale=args.cfg,
                              enable_safety_checker=False, output_format="png")

    cold = {"build_s": t_build.seconds}
    for level in [lv for lv in LEVELS if lv in wanted]:
        reset_peak()
        with C.Timer(sync) as warm:
            report = engine.accelerator.warmup([(args.width, args.height)], levels=(level,),
                                               batch_sizes=(2 if args.cfg > 1 else 1,))
        cold[f"{level}_warmup_s"] = warm.seconds
        with C.Timer(sync) as first:
            engine.generate(request(level))
        seconds, result = [], None
        for _ in range(args.repeats):
            with C.Timer(sync) as t:
                result = engine.generate(request(level))
            seconds.append(t.seconds)
        images[level] = result.images[0].data
        notes = [line for line in result.logs if line.startswith("first_block_cache")]
        add_row(f"engine {level}", seconds, peak_gib(), first=first.seconds, warmup=warm.seconds,
                techniques=result.techniques, timings=result.timings, notes=notes)
        extra.setdefault("warmup_reports", {})[level] = report

    # ---------------------------------------------------------------- quality vs none
    quality = {}
    if "none" in images:
        for name, img in images.items():
            if name != "none":
                quality[name] = {"psnr_vs_none": C.psnr(img, images["none"]),
                                 "ssim_vs_none": C.ssim(img, images["none"])}
        for row in rows:
            key = "diffusers" if row["config"].startswith("diffusers") else row["config"].removeprefix("engine ")
            if key in quality:
                row.update(quality[key])
        const = {name: float(C.to_array(img).std()) for name, img in images.items()}
        extra["image_std"] = const  # 0 would mean a constant (e.g. NaN -> black) image

    # ---------------------------------------------------------------- batching
    if args.batching and "regular" in wanted:
        per = 2 if args.cfg > 1 else 1
        # Compile the larger batches first: after warm-up, a shape not warmed would run eagerly.
        engine.accelerator.warmup([(args.width, args.height)], levels=("regular",), batch_sizes=(2 * per, 4 * per))
        batching = C.measure_request_batching(
            engine, lambda k: request("regular", seed=args.seed + k, prompt=f"{C_PROMPT}, variant {k}"),
            repeats=max(1, args.repeats - 1), sync=sync)
        for b in batching:
            b["mfu"] = flops / b["s_per_image"] / C.H100_BF16_PEAK
        extra["batching"] = batching

    # ---------------------------------------------------------------- startup warm-up of the presets
    if args.warm_presets:
        from kleinserve.schema import IMAGE_SIZE_PRESETS

        levels = tuple(lv for lv in ("regular", "high") if lv in wanted)
        with C.Timer(sync) as t:
            report = engine.accelerator.warmup(list(IMAGE_SIZE_PRESETS.values()), levels=levels)
        extra["preset_warmup"] = {"seconds": t.seconds, "levels": levels, "steps": report}

    # ---------------------------------------------------------------- output
    for row in rows:
        row["speedup_vs_diffusers"] = (rows[0]["s_per_image"] / row["s_per_image"]
                                       if rows and rows[0]["config"].startswith("diffusers") else None)
    device_name = env.get("gpu", "CPU (smoke run: NOT GPU figures)")
    title = (f"{size.name} on {device_name}, {args.width}x{args.height}, {args.steps} steps, CFG {args.cfg:g}, "
             f"{str(dtype).removeprefix('torch.')}, {args.repeats} repeats (median); "
             f"{flops / 1e15:.3f} PFLOP/image; MFU vs 989 TFLOP/s")
    table = C.print_table(title, rows, [
        ("config", "configuration", ""), ("s_per_image", "s/image", ".3f"),
        ("speedup_vs_diffusers", "vs diffusers", ".2f"), ("mfu", "MFU", ".1%"), ("peak_gib", "peak GiB", ".1f"),
        ("warmup_s", "warm-up/compile s", ".1f"), ("first_s", "first request s", ".2f"),
        ("psnr_vs_none", "PSNR vs none dB", ".1f"), ("ssim_vs_none", "SSIM vs none", ".4f")])
    for row in rows:
        if row.get("techniques"):
            notes = f"; {'; '.join(row['notes'])}" if row.get("notes") else ""
            print(f"  {row['config']}: {row['techniques']}" + notes)
    cold["regular_cold_start_s"] = cold["build_s"] + cold.get("regular_warmup_s", 0.0)
    cold["high_cold_start_s"] = cold["build_s"] + cold.get("high_warmup_s", 0.0)
    print(f"cold start: build {cold['build_s']:.1f} s (random weights on the device; reading the real "
          f"checkpoint from disk adds its I/O time) + warm-up: "
          + ", ".join(f"{k.removesuffix('_warmup_s')} {v:.1f} s" for k, v in cold.items() if k.endswith("_warmup_s")))
    if extra.get("batching"):
        table += "\n" + C.print_table("regular: requests per engine run (worker --batch-images)", extra["batching"],
                                      C.BATCHING_COLUMNS + [("mfu", "MFU", ".1%")])
    if extra.get("preset_warmup"):
        print(f"startup warm-up of the 6 presets x batches 2/4/1 ({', '.join(extra['preset_warmup']['levels'])}): "
              f"{extra['preset_warmup']['seconds']:.1f} s")
    payload = {"benchmark": "gpu_smoke" if args.tiny else "gpu", "environment": env, "model": size,
               "params": params, "settings": vars(args), "flops_per_image": flops, "rows": rows,
               "cold_start": cold, "quality": quality, "extra": extra, "table": table,
               "wall_seconds": time.perf_counter() - t_start}
    path = C.write_json("gpu_smoke" if args.tiny else "gpu", payload, args.json)
    print(f"\nwrote {path} ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


C_PROMPT = "a red fox resting in fresh snow under soft winter light, detailed fur, gentle bokeh"

if __name__ == "__main__":
    sys.exit(main())
