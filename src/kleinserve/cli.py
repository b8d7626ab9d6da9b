"""`kleinserve generate | serve | calibrate`.

The `generate` flags are generated from `kleinserve.schema.FluxKleinInput` (one flag per field,
--kebab-case), so a field added to the schema gets a flag without touching this file. Defaults live
only in the schema: a flag the user did not give is not passed on.

Exit codes: 0 ok, 1 model unavailable / generation failed, 2 invalid input, 130 cancelled (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

from . import __version__
from .schema import ENDPOINT_ID, INPUT_MODELS, FluxKleinInput, FluxKleinOutput

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130

ENV_MODEL = "KLEINSERVE_MODEL"
ENV_DEBUG = "KLEINSERVE_DEBUG"

DEFAULT_CALIBRATION_PROMPTS = [
    "a photograph of a red fox in a snowy forest at dawn",
    "a bowl of ramen on a wooden table, studio lighting",
    "an aerial view of a coastal city at sunset",
    "a watercolor painting of a lighthouse on a cliff",
    "a close-up portrait of an elderly fisherman, detailed skin texture",
    "a futuristic train station with glass ceilings, people walking",
    "a macro photo of dew drops on a spider web",
    "a cozy library with tall bookshelves and warm lamps",
]

# The name `kleinserve.engine.cns` looks for beside a model's weights (kept here to avoid importing torch).
CALIBRATED_MATRIX_FILENAME = "kleinserve_cns_gamma.csv"

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX\u00d7]\s*(\d+)\s*$")
_NONE_WORDS = {"none", "null"}


class UsageError(Exception):
    """Invalid input: reported on stderr, exit code 2."""


# --------------------------------------------------------------------------------------------------
# Schema -> flags


def flag_for(field_name: str) -> str:
    """The CLI flag of a schema field: `num_inference_steps` -> `--num-inference-steps`."""
    return "--" + field_name.replace("_", "-")


def _union_members(annotation: Any) -> tuple:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _literal_values(annotation: Any) -> list:
    values: list = []
    for member in _union_members(annotation):
        if typing.get_origin(member) is typing.Literal:
            values.extend(typing.get_args(member))
    return values


def _model_members(annotation: Any) -> list[type[BaseModel]]:
    return [m for m in _union_members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]


def _is_optional(annotation: Any) -> bool:
    return type(None) in _union_members(annotation)


def _is_bool(annotation: Any) -> bool:
    members = [m for m in _union_members(annotation) if m is not type(None)]
    return members == [bool]


def _list_item(annotation: Any) -> Any:
    """The item type of a list field (None when not a list)."""
    members = [m for m in _union_members(annotation) if m is not type(None)]
    if len(members) == 1 and typing.get_origin(members[0]) is list:
        args = typing.get_args(members[0])
        return args[0] if args else str
    return None


def _is_union_field(annotation: Any) -> bool:
    return len([m for m in _union_members(annotation) if m is not type(None)]) > 1


def _metavar(name: str, annotation: Any) -> str:
    members = [m for m in _union_members(annotation) if m is not type(None)]
    if _model_members(annotation):
        model = _model_members(annotation)[0]
        if {"width", "height"} <= set(model.model_fields):
            return "PRESET|WxH|JSON"
        return "JSON"
    if members == [int]:
        return "INT"
    if members == [float]:
        return "FLOAT"
    return "TEXT"


def _help_for(name: str, field) -> str:
    text = (field.description or name).rstrip()
    notes = []
    annotation = field.annotation
    literals = _literal_values(annotation)
    if literals and _model_members(annotation):
        notes.append("presets: " + ", ".join(map(str, literals)) + "; or WIDTHxHEIGHT like 640x480, or JSON")
    if _is_optional(annotation):
        notes.append("'none' for null")
    if field.is_required():
        notes.append("required, unless given by --input or as PROMPT" if name == "prompt" else "required")
    else:
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump()
        notes.append(f"default: {json.dumps(default)}")
    if notes:
        text += " (" + "; ".join(notes) + ")"
    return text.replace("%", "%%")


def add_schema_arguments(parser: argparse.ArgumentParser, model: type[BaseModel] = FluxKleinInput) -> None:
    """One flag per field of `model`. Unset flags are absent from the namespace (default SUPPRESS)."""
    group = parser.add_argument_group(
        f"request ({model.__name__}; every field of the endpoint's input, defaults from the schema)")
    for name, field in model.model_fields.items():
        annotation = field.annotation
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help_for(name, field)}
        item = _list_item(annotation)
        if _is_bool(annotation):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif item is not None and isinstance(item, type) and issubclass(item, BaseModel):
            kwargs["metavar"] = "JSON"  # a JSON list of objects, e.g. --loras '[{"path": ..., "scale": 0.8}]'
        elif item is not None:
            kwargs["nargs"] = "+"  # --image-urls A B C
            kwargs["metavar"] = "URL|PATH" if name.endswith("urls") else "VALUE"
        else:
            literals = _literal_values(annotation)
            if literals and not _is_union_field(annotation) and all(isinstance(v, str) for v in literals):
                # No argparse `choices`: pydantic reports a bad value like every other field error.
                kwargs["metavar"] = "{" + ",".join(literals) + "}"
            else:
                kwargs["metavar"] = _metavar(name, annotation)
        group.add_argument(flag_for(name), **kwargs)


def _coerce_value(name: str, raw: Any, model: type[BaseModel] = FluxKleinInput) -> Any:
    """A flag's text (or an --input value) turned into what pydantic should validate.

    Numbers stay text (pydantic's lax mode parses them and reports errors per field); 'none' -> None
    for optional fields; WxH / JSON for fields that accept an object.
    """
    field = model.model_fields.get(name)
    if field is None or not isinstance(raw, str):
        return raw
    annotation = field.annotation
    text = raw.strip()
    if _is_optional(annotation) and text.lower() in _NONE_WORDS:
        return None
    item = _list_item(annotation)
    if item is not None and isinstance(item, type) and issubclass(item, BaseModel):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{flag_for(name)}: not valid JSON (a list like '[{{\"path\": \"a.safetensors\", "
                             f"\"scale\": 0.8}}]'): {exc}") from exc
    models = _model_members(annotation)
    if models:
        m = _SIZE_RE.match(text)
        if m and any({"width", "height"} <= set(mm.model_fields) for mm in models):
            return {"width": int(m.group(1)), "height": int(m.group(2))}
        if text.startswith("{"):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{flag_for(name)}: not valid JSON: {exc}") from exc
    return raw


def load_input_json(value: str) -> dict:
    """--input: inline JSON ('{...}'), '-' for stdin, or a path to a JSON file."""
    text = value.strip()
    source = "--input"
    if text == "-":
        text = sys.stdin.read()
        source = "--input (stdin)"
    elif not text.startswith("{"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise UsageError(f"--input: {value!r} is neither a JSON object nor an existing file")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--input: cannot read {path}: {exc}") from exc
        source = f"--input {path}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a JSON object, got {type(data).__name__}")
    # Accept the fal client's envelope {"input": {...}} too.
    if set(data) == {"input"} and isinstance(data["input"], dict):
        data = data["input"]
    return data


def _format_loc(model: type[BaseModel], data: dict, loc: tuple) -> str:
    if not loc:
        return "request"
    name = str(loc[0])
    rest = [str(p) for p in loc[1:]]
    field = model.model_fields.get(name)
    if field is not None and _is_union_field(field.annotation) and rest:
        rest = rest[1:]  # drop the union member tag ("ImageSize", "literal[...]")
    label = flag_for(name) if field is not None else name
    return label + ("." + ".".join(rest) if rest else "")


def format_validation_error(exc: ValidationError, data: dict, model: type[BaseModel] = FluxKleinInput) -> str:
    """One line per error: `--flag[.sub]: message (got: value)`, union noise removed."""
    lines = []
    seen = set()
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        name = str(loc[0]) if loc else ""
        field = model.model_fields.get(name)
        if field is not None and _is_union_field(field.annotation) and len(loc) > 1:
            tag = str(loc[1])
            value = data.get(name)
            if isinstance(value, dict) and tag.startswith("literal["):
                continue  # an object was given: the preset branch's complaint is noise
            if isinstance(value, str) and not tag.startswith("literal["):
                continue  # a preset name was given: the object branch's complaint is noise
        where = _format_loc(model, data, loc)
        msg = err.get("msg", "invalid")
        line = f"  {where}: {msg}"
        if "input" in err and err.get("type") != "missing" and not isinstance(err["input"], dict):
            line += f" (got: {json.dumps(err['input'], default=str)})"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return "\n".join(lines)


def _local_image_as_data_uri(value: Any, index: int) -> Any:
    """A local file given to --image-urls, as a data: URI (the endpoint's input takes URLs only)."""
    if not isinstance(value, str) or value.lower().startswith(("http://", "https://", "data:")):
        return value
    import base64
    import mimetypes

    path = Path(value).expanduser()
    if not path.is_file():
        raise UsageError(f"--image-urls[{index}]: no such file: {value} "
                         "(give a local file, an https URL or a data: URI)")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def build_request(args: argparse.Namespace, model: type[FluxKleinInput] = FluxKleinInput) -> FluxKleinInput:
    """--input, then the flags the user gave (flags override), validated by the schema."""
    data: dict[str, Any] = {}
    if getattr(args, "input", None):
        data.update(load_input_json(args.input))
    args.unknown_input_keys = sorted(k for k in data if k not in model.model_fields)
    if getattr(args, "prompt_arg", None) is not None:
        data["prompt"] = args.prompt_arg
    for name in model.model_fields:
        if hasattr(args, name):
            data[name] = getattr(args, name)
    data = {k: _coerce_value(k, v, model) for k, v in data.items()}
    if isinstance(data.get("image_urls"), list):
        data["image_urls"] = [_local_image_as_data_uri(v, k) for k, v in enumerate(data["image_urls"])]
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UsageError("invalid request:\n" + format_validation_error(exc, data, model)) from None


# --------------------------------------------------------------------------------------------------
# Helpers shared by generate and calibrate


def _eprint(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


class _EngineWarnings:
    """The engine's own warnings on stderr as plain lines (the CLI configures no logging). The tiny
    model's banner is one of them, logged by the loader; `saw_tiny_banner` tells whether it was, so
    the CLI prints it itself only when the loader did not (an engine it got ready-made)."""

    def __init__(self) -> None:
        import logging

        self.saw_tiny_banner = False
        outer = self

        class Handler(logging.StreamHandler):
            def emit(self, record: logging.LogRecord) -> None:
                if "TINY RANDOM" in record.getMessage():
                    outer.saw_tiny_banner = True
                super().emit(record)

        self.handler = Handler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.handler.setLevel(logging.WARNING)
        self.logger = logging.getLogger("kleinserve")

    def __enter__(self) -> _EngineWarnings:
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.logger.removeHandler(self.handler)


def _load_engine(args: argparse.Namespace, command: str):
    """The model for `kleinserve <command>`, with the tiny-model warning; None after saying why when
    it is unavailable. Ctrl-C while loading: KeyboardInterrupt ("aborted", exit 130)."""
    from .engine import ModelUnavailable, load_engine  # lazy: torch/diffusers only when a model is needed

    kwargs: dict[str, Any] = {"device": args.device, "dtype": args.dtype,
                              "cpu_offload": bool(getattr(args, "cpu_offload", False))}
    spec = args.model
    endpoint = getattr(args, "endpoint", None)
    if spec.strip() == "auto" and endpoint:  # the checkpoint of the endpoint's family
        from .engine.models import resolve_spec
        from .schema import family_of

        family = family_of(endpoint)
        spec = resolve_spec("auto", repo_id=family.default_repo, distilled=family.distilled)
    with _EngineWarnings() as warnings:
        try:
            engine = load_engine(spec, **kwargs)
        except ModelUnavailable as exc:
            _eprint(f"kleinserve {command}: model unavailable: {exc}")
            return None
    if engine.info.is_tiny and not warnings.saw_tiny_banner:
        from .engine.models import TINY_BANNER

        _eprint(TINY_BANNER)
    info = engine.info
    _eprint(f"model: {info.spec} -> {info.source} on {info.device} ({info.dtype})")
    return engine


def _read_cns_matrix(path: str):
    """--cns-matrix: a gamma matrix CSV (`kleinserve calibrate`), read before the model loads."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--cns-matrix: no such file: {path}")
    from .engine import cns

    try:
        return cns.GammaMatrix.load_csv(p)
    except Exception as exc:  # noqa: BLE001 - a bad file is a usage error
        raise UsageError(f"--cns-matrix: cannot read {p}: {exc}") from exc


def _install_cns_matrix(engine, matrix) -> str:
    """Make `matrix` the calibrated matrix that serves requests with cns_gamma_source=matrix."""
    engine.set_cns_matrix(matrix)
    return f"CNS gamma matrix {matrix.name!r} ({matrix.num_rows} rows x {matrix.num_bins} bins)"


class _Progress:
    """tqdm on stderr, fed by StepEvents (which may arrive on another thread)."""

    def __init__(self, enabled: bool, desc: str = "denoise"):
        self.enabled = enabled
        self.desc = desc
        self.bar: Any = None  # a tqdm bar, made on the first event
        self._lock = threading.Lock()

    def start(self, total: int) -> None:
        """Shows the bar at 0 now, so its first rate reading measures a real step (prompt encoding
        included), not the instant between the first event and the bar's creation."""
        if not self.enabled:
            return
        with self._lock:
            if self.bar is None:
                self.bar = self._new_bar(total)

    def _new_bar(self, total: int):
        from tqdm import tqdm

        return tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr, dynamic_ncols=True, leave=True,
                    smoothing=0.1)

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self.bar is None:
                self.bar = self._new_bar(event.total)
            if self.bar.total != event.total:
                self.bar.total = event.total
            self.bar.n = min(event.step, event.total)
            self.bar.set_postfix_str(f"sigma={event.sigma:.3f}", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.close()
                self.bar = None


def _run_cancellable(fn, cancel: threading.Event, what: str = "generation"):
    """Run fn() in a worker thread; Ctrl-C sets `cancel` (the engine stops between steps, cleanly);
    a second Ctrl-C raises KeyboardInterrupt at once."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            box["error"] = exc

    interrupts = [0]

    def on_sigint(signum, frame):
        interrupts[0] += 1
        cancel.set()
        if interrupts[0] > 1:
            raise KeyboardInterrupt
        _eprint(f"\ncancelling {what} (Ctrl-C again to abort at once)...")

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        thread = threading.Thread(target=target, name=f"kleinserve-{what}", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if "error" in box:
        raise box["error"]
    return box.get("result")


# --------------------------------------------------------------------------------------------------
# generate


def run_stem(directory: Path, seed: int, count: int) -> str:
    """The name stem of one run's files: image k is `<stem>-<k>.<ext>`. `<seed>` when no file of that
    run's names exists yet, else `<seed>-run2`, `<seed>-run3`, ...: a run's files share one scheme and
    never mix with an earlier run's (whatever their extension)."""
    def taken(stem: str) -> bool:
        return any(next(directory.glob(f"{stem}-{k}.*"), None) is not None for k in range(count))

    stem, n = str(seed), 2
    while directory.is_dir() and taken(stem):
        stem = f"{seed}-run{n}"
        n += 1
    return stem


def build_output(request: FluxKleinInput, result, out_dir: Optional[Path]) -> FluxKleinOutput:
    """Write the images (unless sync_mode) and build the endpoint's output."""
    from .engine.imageio import data_uri

    files = []
    stem = str(result.seed)
    if out_dir is not None and not request.sync_mode:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = run_stem(out_dir, result.seed, len(result.images))
    for k, img in enumerate(result.images):
        if request.sync_mode or out_dir is None:
            files.append((data_uri(img.data, img.content_type), f"{result.seed}-{k}.{img.extension}"))
        else:
            path = out_dir / f"{stem}-{k}.{img.extension}"
            path.write_bytes(img.data)
            files.append((str(path.resolve()), path.name))
    return FluxKleinOutput.from_result(request, result, files)


def _resolve_files(request: Any, args: argparse.Namespace) -> tuple[list, list]:
    """The request's input images and LoRA files (local paths allowed), or UsageError naming the item."""
    images: list[Any] = []
    loras: list[Any] = []
    if not (getattr(request, "image_urls", None) or getattr(request, "loras", None)):
        return images, loras
    from .service.inputs import InputError, InputSources, resolve_images
    from .service.loras import LoraCache

    sources = InputSources(allow_local_paths=True)
    try:
        if getattr(request, "image_urls", None):
            images = resolve_images(request.image_urls, sources)
        if getattr(request, "loras", None):
            cache = LoraCache(Path(args.lora_cache).expanduser(), max_bytes=args.lora_cache_bytes)
            loras = cache.resolve(request.loras, sources)
    except InputError as exc:
        raise UsageError(f"invalid input: {flag_for(exc.field_name)}"
                         f"{'' if exc.index is None else f'[{exc.index}]'}: {exc.reason}") from None
    return images, loras


def cmd_generate(args: argparse.Namespace) -> int:
    model = INPUT_MODELS[args.endpoint]
    request = build_request(args, model)
    quiet = args.quiet
    matrix = _read_cns_matrix(args.cns_matrix) if args.cns_matrix else None
    for key in getattr(args, "unknown_input_keys", []):
        if not quiet:
            _eprint(f"note: --input key {key!r} is not a field of the endpoint's input; ignored")

    from .engine import GenerationCancelled
    from .engine.types import LoraFormatError

    images, loras = _resolve_files(request, args)
    cancel = threading.Event()
    engine = _load_engine(args, "generate")
    if engine is None:
        return EXIT_FAILED
    if matrix is not None:
        note = _install_cns_matrix(engine, matrix)
        if not quiet:
            _eprint(f"note: {note}")
            if not request.enable_cns or request.cns_gamma_source != "matrix":
                _eprint("note: --cns-matrix only matters with --enable-cns and --cns-gamma-source matrix")

    progress = _Progress(enabled=not quiet and not args.no_progress)
    progress.start(int(request.num_inference_steps))
    try:
        result = _run_cancellable(
            lambda: engine.generate(request, on_step=progress, should_cancel=cancel.is_set,
                                    reference_images=images, loras=loras),
            cancel, "generation")
    except LoraFormatError as exc:
        progress.close()
        raise UsageError(f"invalid input: --loras: {exc}") from None
    except GenerationCancelled:
        progress.close()
        _eprint("cancelled: nothing written")
        return EXIT_CANCELLED
    progress.close()
    if cancel.is_set():  # finished in the same instant as the Ctrl-C: honour the cancel
        _eprint("cancelled: nothing written")
        return EXIT_CANCELLED

    if not quiet:
        for line in result.logs:
            _eprint(f"note: {line}")
        if result.techniques:
            _eprint("note: acceleration: " + ", ".join(result.techniques))
    output = build_output(request, result, None if request.sync_mode else Path(args.out))
    if not quiet and any(output.has_nsfw_concepts):
        _eprint("note: the safety checker flagged an image; it was replaced by a black image")
    sys.stdout.write(json.dumps(output.model_dump(mode="json"), indent=2) + "\n")
    sys.stdout.flush()
    return EXIT_OK


def _add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=os.environ.get(ENV_MODEL) or "auto", metavar="SPEC",
                   help="auto (the real model on CUDA, else tiny), tiny, a local diffusers folder, or a "
                        f"Hugging Face repo id (default: ${ENV_MODEL} or auto)")
    g.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: best available)")
    g.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: per device)")
    g.add_argument("--cpu-offload", action="store_true",
                   help="keep weights in CPU memory and move each model to the GPU only while it runs")


def add_generate_parser(sub, endpoint: str = ENDPOINT_ID) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate", help="generate images from the command line",
        description="Generate images with the same input as the HTTP endpoint. Every field of the "
                    "endpoint's input has a flag; --input gives a whole request as JSON (flags override it). "
                    "Prints the endpoint's output JSON on stdout; progress and notes go to stderr.")
    p.add_argument("prompt_arg", nargs="?", default=None, metavar="PROMPT",
                   help="the prompt (same as --prompt; --prompt wins when both are given)")
    p.add_argument("--endpoint", default=endpoint, choices=list(INPUT_MODELS), metavar="ENDPOINT_ID",
                   help=f"which endpoint's input to take: {', '.join(INPUT_MODELS)} (default: {ENDPOINT_ID}); "
                        "edit endpoints take --image-urls (URLs, data: URIs or local files), LoRA ones --loras")
    p.add_argument("--lora-cache", default=str(Path.home() / ".cache" / "kleinserve" / "lora-cache"), metavar="DIR",
                   help="where LoRA files given by URL are kept (default: ~/.cache/kleinserve/lora-cache)")
    p.add_argument("--lora-cache-bytes", type=int, default=8 * 1024**3, metavar="BYTES",
                   help="the most that folder may hold; least recently used files go first (default: 8 GiB)")
    p.add_argument("--input", metavar="JSON|FILE|-",
                   help="a request as inline JSON ('{...}'), a JSON file, or - for stdin")
    _add_engine_arguments(p)
    p.add_argument("--cns-matrix", metavar="FILE", default=None,
                   help="a calibrated CNS gamma matrix CSV (from `kleinserve calibrate`) for cns_gamma_source=matrix")
    p.add_argument("--out", default="outputs", metavar="DIR",
                   help="where images are written as <seed>-<k>.<ext> (<seed>-run2-<k>.<ext>, ... when an earlier "
                        "run wrote those names; nothing is written with --sync-mode)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no notes on stderr")
    add_schema_arguments(p, INPUT_MODELS[endpoint])
    p.set_defaults(func=cmd_generate)
    return p


# --------------------------------------------------------------------------------------------------
# calibrate


def _read_prompts(path: Optional[str]) -> list[str]:
    if not path:
        return list(DEFAULT_CALIBRATION_PROMPTS)
    p = Path(path).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"--prompts: cannot read {path}: {exc}") from exc
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"--prompts: {path} has no prompts (one per line)")
    return prompts


_CALIBRATION_FLAGS = {"guidance_scale": "--guidance-scale", "num_inference_steps": "--steps",
                      "image_size": "", "cns_num_freq_bins": "--bins"}


def _validate_calibration(args: argparse.Namespace) -> None:
    """The calibration settings obey the endpoint's limits (they become requests): checked by the schema."""
    errors = []
    if args.num_samples < 1:
        errors.append("--num-samples: must be >= 1")
    if args.seed < 0:
        errors.append("--seed: must be >= 0")
    data = {"prompt": "calibration", "guidance_scale": args.guidance_scale, "num_inference_steps": args.steps,
            "image_size": {"width": args.width, "height": args.height}, "cns_num_freq_bins": args.bins}
    try:
        FluxKleinInput.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            if not loc:
                continue
            if loc[0] == "image_size":
                if len(loc) < 3:
                    continue  # the preset branch of the union
                flag = "--" + loc[-1]
            else:
                flag = _CALIBRATION_FLAGS.get(loc[0], flag_for(loc[0]))
            errors.append(f"{flag}: {err.get('msg', 'invalid')} (got: {err.get('input')})")
    if errors:
        raise UsageError("invalid calibration settings:\n" + "\n".join("  " + e for e in errors))


def cmd_calibrate(args: argparse.Namespace) -> int:
    _validate_calibration(args)
    prompts = _read_prompts(args.prompts)
    seeds = list(range(args.seed, args.seed + args.num_samples))
    from .engine import GenerationCancelled, cns

    cancel = threading.Event()
    engine = _load_engine(args, "calibrate")
    if engine is None:
        return EXIT_FAILED
    info = engine.info
    total = len(prompts) * len(seeds)
    if not args.quiet:
        _eprint(f"calibrating: {len(prompts)} prompt(s) x {len(seeds)} seed(s) = {total} trajectories, "
                f"{args.steps} steps, {args.width}x{args.height}, guidance {args.guidance_scale}, "
                f"{args.bins} bins")
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="calibrate", unit="sample", file=sys.stderr, dynamic_ncols=True)

    def on_sample(done: int, _total: int) -> None:
        if bar is not None:
            bar.n = done
            bar.refresh()
        if cancel.is_set():
            raise GenerationCancelled(f"calibration cancelled after {done}/{_total} samples")

    started = time.perf_counter()
    try:
        matrix = _run_cancellable(
            lambda: cns.calibrate(engine, prompts, guidance_scale=args.guidance_scale, width=args.width,
                                  height=args.height, num_inference_steps=args.steps, seeds=seeds,
                                  num_freq_bins=args.bins, name=Path(args.out).stem, on_sample=on_sample),
            cancel, "calibration")
    except GenerationCancelled:
        _eprint("cancelled: nothing written")
        return EXIT_CANCELLED
    finally:
        if bar is not None:
            bar.close()
    if cancel.is_set():
        _eprint("cancelled: nothing written")
        return EXIT_CANCELLED
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    source = info.source
    comment = (f"calibrated by kleinserve {__version__} for model {source}"
               f"{' (TINY RANDOM MODEL)' if info.is_tiny else ''}: "
               f"{len(prompts)} prompts x {len(seeds)} seeds, guidance {args.guidance_scale}, "
               f"{args.width}x{args.height}, {args.steps} steps")
    matrix.save_csv(out, comment=comment)
    elapsed = time.perf_counter() - started
    if not args.quiet:
        _eprint(f"wrote {out.resolve()} ({matrix.num_rows} rows x {matrix.num_bins} bins, {elapsed:.1f}s)")
    summary = {"path": str(out.resolve()), "rows": matrix.num_rows, "bins": matrix.num_bins,
               "prompts": len(prompts), "seeds": seeds, "num_inference_steps": args.steps,
               "guidance_scale": args.guidance_scale, "width": args.width, "height": args.height,
               "model": source, "is_tiny": info.is_tiny,
               "seconds": round(elapsed, 3)}
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    sys.stdout.flush()
    return EXIT_OK


def add_calibrate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "calibrate", help="calibrate a CNS gamma matrix for a model",
        description="Run deterministic Euler trajectories (CNS off) and measure, per radial frequency band, "
                    "how far each step's x0 estimate has resolved the final image (the CNS paper's "
                    "procedure). Writes a CSV for `generate --cns-matrix`, or to install beside a model's "
                    f"weights as {CALIBRATED_MATRIX_FILENAME}. Prints a JSON summary on stdout.")
    _add_engine_arguments(p)
    g = p.add_argument_group("calibration")
    g.add_argument("--prompts", metavar="FILE", default=None,
                   help="prompt file, one per line, '#' comments (default: a built-in list of "
                        f"{len(DEFAULT_CALIBRATION_PROMPTS)} prompts)")
    g.add_argument("--num-samples", type=int, default=2, metavar="N",
                   help="seeds per prompt; trajectories = prompts x N (default: 2)")
    g.add_argument("--seed", type=int, default=0, metavar="INT",
                   help="first seed; the seeds are seed .. seed+N-1 (default: 0)")
    g.add_argument("--guidance-scale", type=float, default=5.0, metavar="FLOAT",
                   help="guidance scale to calibrate for (default: 5.0, the endpoint's default)")
    g.add_argument("--steps", type=int, default=28, metavar="INT",
                   help="denoising steps per trajectory, 4..50 (default: 28)")
    g.add_argument("--width", type=int, default=512, metavar="PX", help="64..2048 (default: 512)")
    g.add_argument("--height", type=int, default=512, metavar="PX", help="64..2048 (default: 512)")
    g.add_argument("--bins", type=int, default=32, metavar="K", help="radial frequency bins, 8..128 (default: 32)")
    g.add_argument("--out", default=CALIBRATED_MATRIX_FILENAME, metavar="FILE",
                   help=f"CSV to write (default: ./{CALIBRATED_MATRIX_FILENAME}); as "
                        f"<model folder>/{CALIBRATED_MATRIX_FILENAME} it serves that model automatically")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no notes on stderr")
    p.set_defaults(func=cmd_calibrate)
    return p


# --------------------------------------------------------------------------------------------------
# serve (delegated to kleinserve.api.server, imported lazily)


def add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="run the HTTP service (fal queue API, playground, ...)",
                       add_help=False, description="Run the HTTP service; see `kleinserve serve --help`.")
    p.set_defaults(func=None, command="serve")
    return p


def cmd_serve(argv: Sequence[str]) -> int:
    try:
        from .api.server import add_serve_arguments, run_serve
    except ImportError as exc:
        _eprint(f"kleinserve serve: the service is not available in this installation: {exc}")
        return EXIT_FAILED
    parser = argparse.ArgumentParser(prog="kleinserve serve", description="Run the HTTP service.")
    add_serve_arguments(parser)
    args = parser.parse_args(list(argv))
    rc = run_serve(args)
    return int(rc) if isinstance(rc, int) else EXIT_OK


def add_worker_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("worker", help="run one worker process (claims jobs from --store, runs them on --device)",
                       add_help=False, description="Run a worker process; see `kleinserve worker --help`.")
    p.set_defaults(func=None, command="worker")
    return p


def cmd_worker(argv: Sequence[str]) -> int:
    from .service.worker_process import run_worker

    return run_worker(list(argv))


# --------------------------------------------------------------------------------------------------
# keys


def _key_store(args: argparse.Namespace):
    from .service.auth import FileKeyStore
    from .service.settings import Settings

    try:
        settings = Settings.from_sources({"data_dir": args.data_dir})
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return FileKeyStore.in_data_dir(settings.data_dir)


def cmd_keys(args: argparse.Namespace) -> int:
    try:
        store = _key_store(args)
        if args.action == "create":
            record, key = store.create(label=args.label or "")
            _eprint(f"created key {record.id} in {store.location} (only its hash is kept: copy it now).")
            _eprint(f"use it as FAL_KEY, in the playground's key field, or as 'Authorization: Key {key}'")
            sys.stdout.write(key + "\n")
            return EXIT_OK
        if args.action == "revoke":
            if not args.key_id:
                raise UsageError("revoke needs the key's id (see `kleinserve keys list`)")
            if not store.remove(args.key_id):
                raise UsageError(f"no key {args.key_id!r} in {store.location} (see `kleinserve keys list`)")
            _eprint(f"revoked key {args.key_id}: it stops working on its next request")
            return EXIT_OK
        records = store.list()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not records:
        _eprint(f"no stored keys in {store.location}; `kleinserve keys create` makes one")
    for r in records:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at)) if r.created_at else "?"
        sys.stdout.write(f"{r.id}  {r.hint:<16}  created {created}  {r.label}\n")
    return EXIT_OK


def add_keys_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "keys", help="list, create or revoke the stored API keys",
        description="The API keys `kleinserve serve` accepts besides --api-key, kept hashed in "
                    "<data-dir>/keys/api_keys.json (mode 0600). `create` prints the new key once on stdout.")
    p.add_argument("action", choices=("list", "create", "revoke"), nargs="?", default="list",
                   help="list (default), create, or revoke ID")
    p.add_argument("key_id", nargs="?", default=None, metavar="ID", help="the key to revoke (its id from `list`)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="the server's data dir (default: $KLEINSERVE_DATA_DIR or ./data)")
    p.add_argument("--label", default=None, metavar="TEXT", help="a note stored with a created key")
    p.set_defaults(func=cmd_keys)
    return p


# --------------------------------------------------------------------------------------------------
# secrets


def cmd_secrets(args: argparse.Namespace) -> int:
    from .service.runtime import SECRETS_REFRESH_SECONDS, check_rotation, describe_secrets, rotate_secrets
    from .service.settings import Settings, parse_duration
    from .service.store import SecretNotCreated, StoreOutdated, open_store, redact_url

    if args.action != "rotate" and (args.after is not None or args.drop_previous):
        raise UsageError("--after and --drop-previous go with rotate")
    if args.action == "rotate" and args.which is None:
        raise UsageError("rotate needs the secret: webhook-key or upload-secret")
    try:
        settings = Settings.from_sources({"data_dir": args.data_dir, "store": args.store})
        if args.after is not None:
            after = parse_duration(args.after)
        else:  # a new webhook key is published before it signs, unless it replaces a leaked one
            after = DEFAULT_WEBHOOK_KEY_AFTER if args.which == "webhook-key" and not args.drop_previous else 0.0
        if args.action == "rotate":
            check_rotation(args.which, after, args.drop_previous)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    where = redact_url(settings.store_url)
    try:  # never create or upgrade a store from here: that is the servers' part
        store = open_store(settings.store_url, create=False, migrate=False, connect_timeout=10.0)
    except (FileNotFoundError, StoreOutdated) as exc:
        _eprint(f"kleinserve secrets: {exc}" + (": name the store your servers use (--store, KLEINSERVE_STORE "
                                                "or --data-dir)" if isinstance(exc, FileNotFoundError) else ""))
        return EXIT_FAILED
    except Exception as exc:  # the store cannot be opened: say which and why
        _eprint(f"kleinserve secrets: cannot open the store {where}: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    try:
        if args.action == "rotate":
            what = rotate_secrets(store, args.which, after=after, drop_previous=args.drop_previous)
            _eprint(f"rotated {what} in {where}")
            _eprint(_rotation_notes(args.which, after, args.drop_previous, SECRETS_REFRESH_SECONDS))
        for line in describe_secrets(store):
            sys.stdout.write(line + "\n")
    except SecretNotCreated as exc:  # no process has used this store yet (or is it another store?)
        _eprint(f"kleinserve secrets: {exc}; is {where} the store your servers use (--store / KLEINSERVE_STORE)?")
        return EXIT_FAILED
    except Exception as exc:  # the store failed mid-way: nothing half done (one transaction)
        _eprint(f"kleinserve secrets: the store {where} failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        store.close()
    return EXIT_OK


DEFAULT_WEBHOOK_KEY_AFTER = 900.0  # a new webhook key is published this long before it signs


def _rotation_notes(which: str, after: float, drop_previous: bool, refresh: float) -> str:
    gone = "The replaced version is no longer accepted (--drop-previous)." if drop_previous else \
        "The replaced version stays valid until the next rotation."
    if which == "upload-secret":
        return (f"Every kleinserve process of this store signs upload URLs with it within {refresh:.0f} s. {gone}")
    if after:
        return (f"/.well-known/jwks.json publishes it within {refresh:.0f} s; webhooks are signed with it from "
                f"{after:.0f} s on, so receivers that cache the JWKS (up to its max-age) have it by then. {gone}")
    return (f"Webhooks are signed with it within {refresh:.0f} s (at once: receivers holding a cached JWKS may "
            f"refuse deliveries until they fetch it again). {gone}")


def add_secrets_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "secrets", help="show or rotate the shared secrets (webhook signing key, upload-URL secret)",
        description="The secrets every process of a deployment shares, kept in its job store: the Ed25519 key "
                    "that signs webhooks (published at /.well-known/jwks.json) and the secret that signs upload "
                    "URLs. `rotate` makes a new version; the previous one stays valid (published) until the next "
                    "rotation.")
    p.add_argument("action", choices=("show", "rotate"), nargs="?", default="show",
                   help="show (default): their fingerprints; rotate WHICH: a new version")
    p.add_argument("which", nargs="?", default=None, choices=("webhook-key", "upload-secret"),
                   help="the secret to rotate")
    p.add_argument("--after", default=None, metavar="DURATION",
                   help="webhook-key: publish the new key now and sign with it after this long (default 15m; "
                        "at least 5m30s, the JWKS max-age plus a refresh; 0: at once)")
    p.add_argument("--drop-previous", action="store_true",
                   help="replace at once and stop accepting (and publishing) the replaced version: for a "
                        "leaked secret")
    p.add_argument("--store", default=None, metavar="URL",
                   help="the job store (default: $KLEINSERVE_STORE, or the SQLite store under --data-dir)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="the server's data dir (default: $KLEINSERVE_DATA_DIR or ./data)")
    p.set_defaults(func=cmd_secrets)
    return p


# --------------------------------------------------------------------------------------------------


def _endpoint_in(argv: Sequence[str]) -> str:
    """The --endpoint of a `generate` command line (its flags depend on it), else the base endpoint."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--endpoint", default=ENDPOINT_ID)
    known, _ = pre.parse_known_args(list(argv))
    return known.endpoint if known.endpoint in INPUT_MODELS else ENDPOINT_ID


def build_parser(endpoint: str = ENDPOINT_ID) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kleinserve",
        description="Self-hosted, fal-compatible inference for FLUX.2 [klein] 9B base.")
    parser.add_argument("--version", action="version", version=f"kleinserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{generate,serve,worker,calibrate,keys}")
    add_generate_parser(sub, endpoint)
    add_serve_parser(sub)
    add_worker_parser(sub)
    add_calibrate_parser(sub)
    add_keys_parser(sub)
    add_secrets_parser(sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_endpoint_in(argv) if "generate" in argv else ENDPOINT_ID)
    args, extra = parser.parse_known_args(argv)
    if args.command == "serve":
        return cmd_serve(extra)
    if args.command == "worker":
        return cmd_worker(extra)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if extra:  # the subcommand's usage, not the top level's
        _subparser(parser, args.command).error("unrecognized arguments: " + " ".join(extra))  # exits 2
    prog = f"kleinserve {args.command}"
    try:
        rc = args.func(args)
    except UsageError as exc:
        _eprint(f"{prog}: error: {exc}")
        rc = EXIT_USAGE
    except KeyboardInterrupt:
        _eprint("\naborted: nothing written")
        rc = EXIT_CANCELLED
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, unless debugging
        if os.environ.get(ENV_DEBUG):
            raise
        _eprint(f"{prog}: failed: {type(exc).__name__}: {exc}")
        _eprint(f"(set {ENV_DEBUG}=1 for the traceback)")
        rc = EXIT_FAILED
    return rc


if __name__ == "__main__":
    sys.exit(main())
