"""`kleinserve generate | serve | calibrate`.

Two layers: in-process tests with a fake engine (fast; the CLI's own logic: flags, validation, output,
sync mode, cancellation) and subprocess runs of `python -m kleinserve.cli` on the tiny model.
"""

from __future__ import annotations

import _thread
import argparse
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import kleinserve.engine as engine_pkg
from kleinserve import cli
from kleinserve.engine.imageio import encode_image, read_recipe
from kleinserve.engine.types import (
    EncodedImage,
    GenerationCancelled,
    GenerationResult,
    ModelInfo,
    ModelUnavailable,
    StepEvent,
)
from kleinserve.schema import FluxKleinInput, FluxKleinOutput

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# A fake engine with the real interface


class FakeEngine:
    def __init__(self, spec="fake", is_tiny=True, step_hook=None):
        self.info = ModelInfo(spec=spec, source=spec, is_tiny=is_tiny, device="cpu", dtype="float32",
                              load_seconds=0.0)
        self.requests: list[FluxKleinInput] = []
        self.step_hook = step_hook
        self._cns_matrix = None  # where the real engine keeps the calibrated matrix of its model

    def generate(self, request, *, on_step=None, should_cancel=None, preview_every=0):
        self.requests.append(request)
        seed = 42 if request.seed is None else request.seed
        n = request.num_inference_steps
        for i in range(n):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled(f"cancelled before step {i + 1}/{n}")
            if self.step_hook is not None:
                self.step_hook(i)
            if on_step is not None:
                on_step(StepEvent(step=i + 1, total=n, sigma=1.0 - (i + 1) / n))
        w, h = request.resolved_size()
        images = []
        for k in range(request.num_images):
            img = Image.new("RGB", (w, h), (k * 40, 100, 200))
            recipe = request.model_dump(mode="json") | {"seed": seed + k, "model": self.info.source}
            data, ct = encode_image(img, request.output_format, recipe)
            images.append(EncodedImage(data=data, content_type=ct, extension=request.output_format,
                                       width=w, height=h, seed=seed + k, nsfw=False))
        return GenerationResult(images=images, seed=seed, timings={"denoise": 0.01, "total": 0.02},
                                logs=["fake engine"])


@pytest.fixture
def fake(monkeypatch):
    holder: dict = {"engine": FakeEngine(), "calls": []}

    def load_engine(spec="auto", device=None, dtype=None, cpu_offload=False, **kw):
        holder["calls"].append({"spec": spec, "device": device, "dtype": dtype, "cpu_offload": cpu_offload, **kw})
        if spec == "missing":
            raise ModelUnavailable("no model at 'missing': download it first")
        return holder["engine"]

    # Through the module dict: getattr would trigger the lazy import of the real engine (torch).
    monkeypatch.setitem(engine_pkg.__dict__, "load_engine", load_engine)
    return holder


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------------------------------
# Flags generated from the schema


def test_every_schema_field_has_a_flag():
    parser = cli.build_parser()
    gen = parser._subparsers._group_actions[0].choices["generate"]
    flags = {opt: a for a in gen._actions for opt in a.option_strings}
    for name, field in FluxKleinInput.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in flags, f"schema field {name!r} has no {flag} flag"
        action = flags[flag]
        assert action.dest == name
        assert action.default is argparse.SUPPRESS, f"{flag} must not duplicate the schema default"
        if field.annotation is bool:
            assert "--no-" + name.replace("_", "-") in flags, f"{flag} needs a --no- form"


def test_help_lists_schema_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name, field in FluxKleinInput.model_fields.items():
        assert "--" + name.replace("_", "-") in out
    assert "{none,regular,high}" in out and "landscape_4_3" in out


def _parse(*argv):
    args, extra = cli.build_parser().parse_known_args(["generate", *argv])
    assert not extra
    return cli.build_request(args)


def test_only_given_flags_are_passed_defaults_from_schema():
    req = _parse("a cat")
    assert req == FluxKleinInput(prompt="a cat")
    req = _parse("--prompt", "x", "--num-inference-steps", "6", "--guidance-scale", "1",
                 "--no-enable-safety-checker", "--enable-cns", "--seed", "7", "--output-format", "webp",
                 "--acceleration", "none", "--cns-num-freq-bins", "16", "--no-cns-alpha-use-fnorm")
    assert (req.num_inference_steps, req.guidance_scale, req.enable_safety_checker, req.enable_cns) == (6, 1.0, False, True)
    assert (req.seed, req.output_format, req.acceleration, req.cns_num_freq_bins) == (7, "webp", "none", 16)
    assert req.cns_alpha_use_fnorm is False
    assert req.negative_prompt == FluxKleinInput.model_fields["negative_prompt"].default


@pytest.mark.parametrize("value,expected", [
    ("640x480", {"width": 640, "height": 480}),
    ("64X64", {"width": 64, "height": 64}),
    ('{"width": 128, "height": 96}', {"width": 128, "height": 96}),
    ("square_hd", "square_hd"),
])
def test_image_size_forms(value, expected):
    req = _parse("x", "--image-size", value)
    got = req.image_size if isinstance(req.image_size, str) else req.image_size.model_dump()
    assert got == expected


def test_seed_none():
    assert _parse("x", "--seed", "none").seed is None


def test_input_json_inline_file_and_override(tmp_path):
    req = _parse("--input", '{"prompt": "from json", "num_inference_steps": 9, "seed": 3}')
    assert (req.prompt, req.num_inference_steps, req.seed) == ("from json", 9, 3)
    f = tmp_path / "req.json"
    f.write_text(json.dumps({"input": {"prompt": "file", "image_size": "64x80", "guidance_scale": 2}}))
    req = _parse("--input", str(f), "--guidance-scale", "3.5", "--num-inference-steps", "5")
    assert req.prompt == "file" and req.guidance_scale == 3.5 and req.num_inference_steps == 5
    assert req.image_size.model_dump() == {"width": 64, "height": 80}
    req = _parse("--input", str(f), "override prompt")
    assert req.prompt == "override prompt"
    req = _parse("--input", str(f), "--prompt", "flag wins", "positional")
    assert req.prompt == "flag wins"


@pytest.mark.parametrize("argv,needle", [
    (["--num-inference-steps", "2"], "--num-inference-steps"),
    (["--guidance-scale", "99"], "--guidance-scale"),
    (["--image-size", "5000x10"], "--image-size.width"),
    (["--image-size", "5000x10"], "--image-size.height"),
    (["--image-size", "huge"], "--image-size"),
    (["--num-images", "9"], "--num-images"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "abc"], "--seed"),
    (["--acceleration", "turbo"], "--acceleration"),
    (["--output-format", "gif"], "--output-format"),
    (["--cns-num-freq-bins", "1000"], "--cns-num-freq-bins"),
    (["--input", "{not json"], "--input"),
    (["--input", "[1, 2]"], "--input"),
    (["--input", "/nonexistent/request.json"], "--input"),
    (["--input", '{"prompt": "x", "num_inference_steps": 1}'], "--num-inference-steps"),
    (["--image-size", "{bad"], "--image-size"),
])
def test_bad_values_exit_2_naming_the_field(fake, capsys, argv, needle):
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "a prompt", *argv)
    assert rc == 2
    assert out == ""
    assert needle in err
    assert "Traceback" not in err
    assert fake["calls"] == []  # validated before any model is loaded


def test_missing_prompt_exit_2(fake, capsys):
    rc, out, err = run_cli(capsys, "generate")
    assert rc == 2 and "--prompt" in err and "required" in err.lower()


# --------------------------------------------------------------------------------------------------
# generate with the fake engine


def test_generate_writes_files_and_prints_output(fake, capsys, tmp_path):
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--device", "cpu", "--dtype", "float32",
                           "--cpu-offload", "--out", str(tmp_path / "o"), "--seed", "5", "--num-images", "2",
                           "--image-size", "80x64", "--num-inference-steps", "4", "--output-format", "jpeg",
                           "hello")
    assert rc == 0, err
    assert fake["calls"] == [{"spec": "tiny", "device": "cpu", "dtype": "float32", "cpu_offload": True}]
    result = FluxKleinOutput.model_validate_json(out)
    assert result.seed == 5 and result.prompt == "hello" and result.has_nsfw_concepts == [False, False]
    assert [i.file_name for i in result.images] == ["5-0.jpeg", "5-1.jpeg"]
    for img in result.images:
        p = Path(img.url)
        assert p.is_absolute() and p.is_file()
        assert img.file_size == p.stat().st_size
        assert (img.width, img.height, img.content_type) == (80, 64, "image/jpeg")
        assert read_recipe(p.read_bytes())["prompt"] == "hello"
    assert result.timings.total == pytest.approx(0.02)
    assert "TINY" in err  # loud warning for the tiny model
    # A second run with the same seed does not overwrite the first images.
    rc, out2, _ = run_cli(capsys, "generate", "--model", "tiny", "--out", str(tmp_path / "o"), "--seed", "5",
                          "--num-inference-steps", "4", "hello")
    assert rc == 0
    name = FluxKleinOutput.model_validate_json(out2).images[0].file_name
    assert name != "5-0.jpeg" and name.startswith("5-0")


def test_sync_mode_writes_nothing_and_returns_data_uris(fake, capsys, tmp_path):
    out_dir = tmp_path / "o"
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--out", str(out_dir), "--sync-mode",
                           "--num-inference-steps", "4", "--image-size", "64x64", "x")
    assert rc == 0, err
    result = FluxKleinOutput.model_validate_json(out)
    url = result.images[0].url
    assert url.startswith("data:image/png;base64,")
    data = base64.b64decode(url.split(",", 1)[1])
    assert len(data) == result.images[0].file_size
    assert read_recipe(data)["prompt"] == "x"
    assert not out_dir.exists()


def test_model_unavailable_exit_1(fake, capsys):
    rc, out, err = run_cli(capsys, "generate", "--model", "missing", "x")
    assert rc == 1 and out == ""
    assert "download it first" in err and "Traceback" not in err


def test_ctrl_c_cancels_cleanly(fake, capsys, tmp_path):
    def hook(i):
        if i == 1:
            _thread.interrupt_main()  # what Ctrl-C does: KeyboardInterrupt in the main thread
            time.sleep(0.3)

    fake["engine"] = FakeEngine(step_hook=hook)
    out_dir = tmp_path / "o"
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--out", str(out_dir),
                           "--num-inference-steps", "20", "x")
    assert rc == 130
    assert out == "" and "cancel" in err.lower()
    assert not out_dir.exists()


def test_real_model_has_no_tiny_warning(fake, capsys, tmp_path):
    fake["engine"] = FakeEngine(spec="/models/klein", is_tiny=False)
    rc, _, err = run_cli(capsys, "generate", "--model", "/models/klein", "--out", str(tmp_path),
                         "--num-inference-steps", "4", "x")
    assert rc == 0 and "TINY" not in err


def test_unknown_input_keys_are_noted(fake, capsys, tmp_path):
    rc, _, err = run_cli(capsys, "generate", "--model", "tiny", "--out", str(tmp_path),
                         "--input", '{"prompt": "x", "num_inference_steps": 4, "bogus_key": 1}')
    assert rc == 0 and "bogus_key" in err


def test_input_from_stdin(fake, capsys, tmp_path, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO('{"prompt": "piped", "num_inference_steps": 4}'))
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--out", str(tmp_path), "--input", "-")
    assert rc == 0, err
    assert FluxKleinOutput.model_validate_json(out).prompt == "piped"
    assert fake["engine"].requests[-1].num_inference_steps == 4


def test_cns_matrix_flag(fake, capsys, tmp_path):
    from kleinserve.engine.cns import GammaMatrix

    csv = tmp_path / "gamma.csv"
    GammaMatrix(values=[[0.0, 0.1], [0.5, 0.6], [1.0, 1.0]], sigmas=[1.0, 0.5, 0.0], name="g").save_csv(csv)
    rc, _, err = run_cli(capsys, "generate", "--model", "tiny", "--out", str(tmp_path / "o"), "--enable-cns",
                         "--cns-matrix", str(csv), "--num-inference-steps", "4", "x")
    assert rc == 0, err
    matrix = fake["engine"]._cns_matrix
    assert matrix is not None and matrix.num_rows == 3 and matrix.num_bins == 2
    # A missing or malformed file is a usage error, found before the model loads.
    bad = tmp_path / "bad.csv"
    bad.write_text("sigma,bin_0\n1.0,7.5\n")  # gamma outside [0, 1]
    fake["calls"].clear()
    for path in (tmp_path / "missing.csv", bad):
        rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--cns-matrix", str(path), "x")
        assert rc == 2 and "--cns-matrix" in err and out == ""
    assert fake["calls"] == []


def test_generation_failure_is_one_line(fake, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    fake["engine"].generate = boom
    monkeypatch.delenv("KLEINSERVE_DEBUG", raising=False)
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "x")
    assert rc == 1 and out == ""
    assert "CUDA out of memory (simulated)" in err and "Traceback" not in err


def test_no_command_and_unknown_args(capsys):
    assert cli.main([]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "x", "--definitely-not-a-flag"])
    assert exc.value.code == 2


def test_serve_delegates_lazily(monkeypatch, capsys):
    import types as _types

    seen = {}
    mod = _types.ModuleType("kleinserve.api.server")

    def add_serve_arguments(parser):
        parser.add_argument("--port", type=int, default=8000)

    def run_serve(args):
        seen["port"] = args.port
        return 0

    mod.add_serve_arguments = add_serve_arguments
    mod.run_serve = run_serve
    monkeypatch.setitem(sys.modules, "kleinserve.api.server", mod)
    assert cli.main(["serve", "--port", "9123"]) == 0
    assert seen == {"port": 9123}


# --------------------------------------------------------------------------------------------------
# Real runs on the tiny model (subprocess, like a user)


def _cli(*argv, timeout=600, **kw):
    env = dict(os.environ)
    env.pop("KLEINSERVE_MODEL", None)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "kleinserve.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=kw.get("cwd"))


def test_tiny_generate_end_to_end(tmp_path):
    out_dir = tmp_path / "outputs"
    p = _cli("generate", "--model", "tiny", "--image-size", "64x64", "--num-inference-steps", "4",
             "--seed", "11", "--num-images", "2", "--output-format", "png", "--out", str(out_dir),
             "--negative-prompt", "blurry", "a tiny test")
    assert p.returncode == 0, p.stderr
    assert "TINY" in p.stderr
    result = FluxKleinOutput.model_validate_json(p.stdout)
    assert result.seed == 11 and len(result.images) == 2 and result.prompt == "a tiny test"
    assert len(result.has_nsfw_concepts) == 2
    for k, img in enumerate(result.images):
        path = Path(img.url)
        assert path.parent == out_dir.resolve() and path.name == f"11-{k}.png"
        assert img.file_size == path.stat().st_size > 0
        assert (img.width, img.height) == (64, 64)
        with Image.open(path) as im:
            assert im.size == (64, 64)
        recipe = read_recipe(path.read_bytes())
        assert recipe is not None and recipe.get("prompt") == "a tiny test"


def test_tiny_generate_input_json_and_override(tmp_path):
    req = tmp_path / "request.json"
    req.write_text(json.dumps({"prompt": "from file", "image_size": {"width": 64, "height": 80},
                               "num_inference_steps": 4, "seed": 3, "output_format": "webp"}))
    p = _cli("generate", "--model", "tiny", "--input", str(req), "--seed", "4", "--image-size", "96x64",
             "--out", str(tmp_path / "o"))
    assert p.returncode == 0, p.stderr
    result = FluxKleinOutput.model_validate_json(p.stdout)
    assert result.seed == 4 and result.prompt == "from file"
    img = result.images[0]
    assert (img.width, img.height, img.content_type) == (96, 64, "image/webp")
    assert read_recipe(Path(img.url).read_bytes())["prompt"] == "from file"


def test_tiny_bad_values_exit_2():
    for argv, needle in [
        (["--num-inference-steps", "2"], "--num-inference-steps"),
        (["--guidance-scale", "99"], "--guidance-scale"),
        (["--image-size", "5000x10"], "--image-size"),
        (["--input", "{bad json"], "--input"),
    ]:
        p = _cli("generate", "--model", "tiny", "x", *argv, timeout=120)
        assert p.returncode == 2, (argv, p.stderr)
        assert needle in p.stderr and "Traceback" not in p.stderr
        assert p.stdout == ""


def test_python_dash_m_kleinserve():
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    p = subprocess.run([sys.executable, "-m", "kleinserve", "--version"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.returncode == 0 and "kleinserve" in p.stdout


def test_tiny_calibrate_writes_csv(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration prompts\na red square\n\na blue circle\n")
    out = tmp_path / "cal" / "gamma.csv"
    p = _cli("calibrate", "--model", "tiny", "--prompts", str(prompts), "--num-samples", "1",
             "--steps", "4", "--width", "64", "--height", "64", "--bins", "8", "--guidance-scale", "2",
             "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert out.is_file()
    summary = json.loads(p.stdout)
    assert summary["path"] == str(out.resolve()) and summary["prompts"] == 2 and summary["is_tiny"] is True
    from kleinserve.engine.cns import GammaMatrix

    matrix = GammaMatrix.load_csv(out)
    assert matrix.num_bins == 8 and matrix.num_rows == 4
    assert float(matrix.values.min()) >= 0.0 and float(matrix.values.max()) <= 1.0


def test_calibrate_bad_settings_exit_2(tmp_path):
    p = _cli("calibrate", "--model", "tiny", "--steps", "2", "--width", "5000", "--out", str(tmp_path / "x.csv"),
             timeout=120)
    assert p.returncode == 2
    assert "--steps" in p.stderr and "--width" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x.csv").exists()
