"""`kleinserve generate | serve | calibrate`.

Two layers, both on the real engine (never a fake): in-process runs of `cli.main` on the session's
`tiny_engine` (the tiny random model built from the real diffusers/transformers classes), and a few
subprocess runs of `python -m kleinserve.cli` like a user. Requests are small (64x64, 4 steps).

In-process, `kleinserve.engine.load_engine` is wrapped: it records its arguments and returns the shared
real `tiny_engine` for `--model tiny` (instead of building a second one); every other spec goes to the
real `load_engine` (a missing folder really raises ModelUnavailable, a saved folder really loads).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import kleinserve.engine as engine_pkg
from kleinserve import cli
from kleinserve.engine.imageio import read_recipe
from kleinserve.schema import FluxKleinInput, FluxKleinOutput

REPO = Path(__file__).resolve().parents[1]

SMALL = ("--image-size", "64x64", "--num-inference-steps", "4")
# Auxiliary runs: one transformer branch and no safety checker, to keep the suite fast.
CHEAP = (*SMALL, "--guidance-scale", "1", "--no-enable-safety-checker")


# --------------------------------------------------------------------------------------------------
# The real engine, shared


@pytest.fixture
def engine(monkeypatch, request):
    """`load_engine` as the CLI sees it: `tiny` -> the session's real tiny engine, else the real loader.

    `calls` records what the CLI asked for (to check the flags reach the loader, and that invalid input
    never loads a model). The tiny engine is only built when a test really loads it."""
    from kleinserve.engine.engine import load_engine as real_load_engine

    holder: dict = {"engine": None, "calls": []}
    building = []

    def load_engine(spec="auto", **kwargs):
        if building:  # the tiny_engine fixture itself, building the session's engine
            return real_load_engine(spec, **kwargs)
        holder["calls"].append({"spec": spec, **kwargs})
        if spec != "tiny":
            return real_load_engine(spec, **kwargs)
        if holder["engine"] is None:
            building.append(True)
            try:
                tiny = request.getfixturevalue("tiny_engine")
            finally:
                building.clear()
            # The CLI may install a calibrated CNS matrix on it: restore the shared engine afterwards.
            monkeypatch.setattr(tiny, "_cns_matrix", tiny._cns_matrix)
            holder["engine"] = tiny
        return holder["engine"]

    # Through the module dict: the package resolves `load_engine` lazily through __getattr__.
    monkeypatch.setitem(engine_pkg.__dict__, "load_engine", load_engine)
    return holder


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _step_hook(monkeypatch, hook):
    """Call hook(step) from the CLI's own on_step callback (its progress bar), inside the real engine's
    denoising loop, after each step; the real progress bar still runs."""
    original = cli._Progress.__call__

    def __call__(self, event):
        original(self, event)
        hook(event.step)

    monkeypatch.setattr(cli._Progress, "__call__", __call__)


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
    for name in FluxKleinInput.model_fields:
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
    assert ((req.num_inference_steps, req.guidance_scale, req.enable_safety_checker, req.enable_cns)
            == (6, 1.0, False, True))
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
def test_bad_values_exit_2_naming_the_field(engine, capsys, tmp_path, argv, needle):
    out_dir = tmp_path / "o"
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--out", str(out_dir), "a prompt", *argv)
    assert rc == 2
    assert out == ""
    assert needle in err
    assert "Traceback" not in err
    assert engine["calls"] == []  # validated before any model is loaded
    assert not out_dir.exists()


def test_missing_prompt_exit_2(engine, capsys):
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny")
    assert rc == 2 and "--prompt" in err and "required" in err.lower()
    assert out == "" and engine["calls"] == []


# --------------------------------------------------------------------------------------------------
# generate on the real tiny engine


def _check_written(result: FluxKleinOutput, out_dir: Path) -> None:
    for img in result.images:
        p = Path(img.url)
        assert p.is_absolute() and p.is_file() and p.parent == out_dir.resolve()
        assert p.name == img.file_name
        assert img.file_size == os.path.getsize(p) > 0


def test_generate_writes_files_and_prints_output(engine, capsys, tmp_path):
    out_dir = tmp_path / "o"
    argv = ("generate", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--cpu-offload",
            "--out", str(out_dir), "--seed", "5", "--num-images", "2", "--image-size", "80x64",
            "--num-inference-steps", "4", "--output-format", "jpeg", "hello")
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert engine["calls"] == [{"spec": "tiny", "device": "cpu", "dtype": "float32", "cpu_offload": True}]
    result = FluxKleinOutput.model_validate_json(out)
    assert result.seed == 5 and result.prompt == "hello" and result.has_nsfw_concepts == [False, False]
    assert [i.file_name for i in result.images] == ["5-0.jpeg", "5-1.jpeg"]
    _check_written(result, out_dir)
    for k, img in enumerate(result.images):
        p = Path(img.url)
        assert (img.width, img.height, img.content_type) == (80, 64, "image/jpeg")
        with Image.open(p) as im:
            assert (im.format, im.size) == ("JPEG", (80, 64))
        recipe = read_recipe(p.read_bytes())
        assert recipe["prompt"] == "hello" and recipe["seed"] == 5 + k and recipe["image_index"] == k
        assert recipe["num_inference_steps"] == 4 and recipe["image_size"] == {"width": 80, "height": 64}
        assert recipe["output_format"] == "jpeg" and recipe["model_is_tiny"] is True
    first, second = (Path(i.url).read_bytes() for i in result.images)
    assert first != second  # seed + k: two different images
    t = result.timings
    assert t.total > 0 and t.denoise > 0 and t.decode > 0 and t.total >= t.denoise
    assert "TINY" in err  # loud warning for the tiny model
    assert "note: 2 image(s) 80x64, 4 steps, seed 5" in err  # the engine's own log line
    # A second run with the same seed reproduces the same bytes and does not overwrite the first images.
    rc, out2, err = run_cli(capsys, *argv)
    assert rc == 0, err
    again = FluxKleinOutput.model_validate_json(out2)
    assert [i.file_name for i in again.images] == ["5-run2-0.jpeg", "5-run2-1.jpeg"]  # one scheme per run
    _check_written(again, out_dir)
    assert [Path(i.url).read_bytes() for i in again.images] == [first, second]
    assert sorted(p.name for p in out_dir.iterdir()) == ["5-0.jpeg", "5-1.jpeg", "5-run2-0.jpeg", "5-run2-1.jpeg"]


def _data(result: FluxKleinOutput, k: int = 0) -> bytes:
    url = result.images[k].url
    assert url.startswith("data:image/png;base64,")
    return base64.b64decode(url.split(",", 1)[1])


def test_sync_mode_writes_nothing_and_returns_data_uris(engine, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is ./outputs
    out_dir = tmp_path / "o"
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--out", str(out_dir), "--sync-mode",
                           *CHEAP, "x")
    assert rc == 0, err
    result = FluxKleinOutput.model_validate_json(out)
    data = _data(result)
    assert len(data) == result.images[0].file_size
    recipe = read_recipe(data)
    assert recipe["prompt"] == "x" and recipe["seed"] == result.seed  # no --seed: the engine drew one
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (64, 64)
    assert not out_dir.exists() and list(tmp_path.iterdir()) == []
    # The seed in the output reproduces the same bytes.
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--sync-mode", *CHEAP,
                           "--seed", str(result.seed), "x")
    assert rc == 0, err
    again = FluxKleinOutput.model_validate_json(out)
    assert again.seed == result.seed and _data(again) == data
    assert list(tmp_path.iterdir()) == []


def test_model_unavailable_exit_1(engine, capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    rc, out, err = run_cli(capsys, "generate", "--model", str(missing), "x")
    assert rc == 1 and out == ""
    assert "model unavailable" in err and "does not exist" in err and str(missing) in err
    assert "Traceback" not in err
    # A folder that is not a diffusers checkpoint: says what to download.
    empty = tmp_path / "empty-model"
    empty.mkdir()
    rc, out, err = run_cli(capsys, "generate", "--model", str(empty), "x")
    assert rc == 1 and out == ""
    assert "no transformer/ subfolder" in err and "download" in err and "Traceback" not in err
    assert [c["spec"] for c in engine["calls"]] == [str(missing), str(empty)]


def test_ctrl_c_cancels_cleanly(engine, capsys, tmp_path, monkeypatch):
    """A real SIGINT during the real denoising loop: the CLI's handler sets the flag that the engine's
    should_cancel polls between steps; the engine stops, nothing is written, exit 130."""
    notes: list[str] = []
    original_eprint = cli._eprint

    def eprint(*parts):
        notes.append(" ".join(map(str, parts)))
        original_eprint(*parts)

    monkeypatch.setattr(cli, "_eprint", eprint)
    steps: list[int] = []

    def hook(step):
        steps.append(step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
            deadline = time.monotonic() + 30
            while not any("cancelling generation" in n for n in notes) and time.monotonic() < deadline:
                time.sleep(0.01)  # let the main thread run the handler before the next step starts

    _step_hook(monkeypatch, hook)
    handler_before = signal.getsignal(signal.SIGINT)
    out_dir = tmp_path / "o"
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--out", str(out_dir), *CHEAP, "x")
    assert rc == 130, err
    assert out == "" and "cancelling generation" in err and "cancelled: nothing written" in err
    assert steps == [1]  # the engine stopped at the next step boundary
    assert not out_dir.exists()
    assert signal.getsignal(signal.SIGINT) is handler_before  # the CLI's handler was removed


def test_generation_failure_is_one_line(engine, capsys, tmp_path, monkeypatch):
    """An error inside the real engine's loop (raised from the step callback) is one line, exit 1."""
    def hook(step):
        raise RuntimeError("CUDA out of memory (simulated)")

    _step_hook(monkeypatch, hook)
    monkeypatch.delenv("KLEINSERVE_DEBUG", raising=False)
    out_dir = tmp_path / "o"
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--out", str(out_dir), *CHEAP, "x")
    assert rc == 1 and out == ""
    assert "failed: RuntimeError: CUDA out of memory (simulated)" in err and "Traceback" not in err
    assert not out_dir.exists()


def test_real_model_has_no_tiny_warning(engine, capsys, tmp_path, tiny_model_dir):
    # A saved model folder without the tiny marker loads as a real (non-tiny) model.
    from kleinserve.engine.tiny import TINY_MARKER

    folder = tmp_path / "klein"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns(TINY_MARKER))
    rc, out, err = run_cli(capsys, "generate", "--model", str(folder), "--out", str(tmp_path / "o"),
                           *CHEAP, "--seed", "1", "x")
    assert rc == 0, err
    assert "TINY" not in err and "model: tiny" not in err
    result = FluxKleinOutput.model_validate_json(out)
    recipe = read_recipe(Path(result.images[0].url).read_bytes())
    assert recipe["model"] == str(folder.resolve()) and "model_is_tiny" not in recipe
    assert engine["calls"][0]["spec"] == str(folder)


def test_input_json_file_and_override(engine, capsys, tmp_path):
    req = tmp_path / "request.json"
    req.write_text(json.dumps({"prompt": "from file", "image_size": {"width": 64, "height": 80},
                               "num_inference_steps": 4, "seed": 3, "output_format": "webp",
                               "guidance_scale": 1, "enable_safety_checker": False}))
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--input", str(req), "--seed", "4",
                           "--image-size", "96x64", "--out", str(tmp_path / "o"))
    assert rc == 0, err
    result = FluxKleinOutput.model_validate_json(out)
    assert result.seed == 4 and result.prompt == "from file"
    img = result.images[0]
    assert (img.width, img.height, img.content_type) == (96, 64, "image/webp")
    assert img.file_name == "4-0.webp" and img.file_size == os.path.getsize(img.url)
    with Image.open(img.url) as im:
        assert (im.format, im.size) == ("WEBP", (96, 64))
    recipe = read_recipe(Path(img.url).read_bytes())
    assert recipe["prompt"] == "from file" and recipe["seed"] == 4
    assert recipe["image_size"] == {"width": 96, "height": 64} and recipe["guidance_scale"] == 1


def test_input_from_stdin_and_unknown_keys_noted(engine, capsys, tmp_path, monkeypatch):
    request = {"prompt": "piped", "num_inference_steps": 5, "image_size": "64x64", "guidance_scale": 1,
               "enable_safety_checker": False, "sync_mode": True, "bogus_key": 1}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"input": request})))  # the fal envelope
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--out", str(tmp_path / "o"), "--input", "-")
    assert rc == 0, err
    assert "bogus_key" in err and "ignored" in err
    result = FluxKleinOutput.model_validate_json(out)
    assert result.prompt == "piped"
    recipe = read_recipe(_data(result))
    assert recipe["num_inference_steps"] == 5 and "bogus_key" not in recipe  # what the engine really ran
    assert "5 steps" in err


def test_cns_matrix_flag(engine, capsys, tmp_path):
    from kleinserve.engine.cns import GammaMatrix

    csv = tmp_path / "gamma.csv"
    GammaMatrix(values=[[0.0, 0.1], [0.5, 0.6], [1.0, 1.0]], sigmas=[1.0, 0.5, 0.0], name="g").save_csv(csv)
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--out", str(tmp_path / "o"), "--enable-cns",
                           "--cns-gamma-source", "matrix", "--seed", "2", *CHEAP, "x")
    assert rc == 0, err
    assert "gamma=matrix" in err and "(bundled," in err  # no --cns-matrix: the bundled table
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--out", str(tmp_path / "o"), "--enable-cns",
                           "--cns-gamma-source", "matrix", "--cns-matrix", str(csv), "--seed", "2", *CHEAP, "x")
    assert rc == 0, err
    # The engine really sampled with the file's matrix (its own log line, relayed as a note).
    assert "note: CNS gamma matrix" in err and "(3 rows x 2 bins)" in err
    assert "(calibrated, 3x2)" in err and "(bundled," not in err
    matrix = engine["engine"]._cns_matrix
    assert matrix is not None and matrix.num_rows == 3 and matrix.num_bins == 2
    # A missing or malformed file is a usage error, found before the model loads.
    bad = tmp_path / "bad.csv"
    bad.write_text("sigma,bin_0\n1.0,7.5\n")  # gamma outside [0, 1]
    engine["calls"].clear()
    for path in (tmp_path / "missing.csv", bad):
        rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--cns-matrix", str(path), "x")
        assert rc == 2 and "--cns-matrix" in err and out == ""
    assert engine["calls"] == []


def test_calibrate_writes_csv(engine, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration prompts\na red square\n\na blue circle\n")
    out = tmp_path / "cal" / "gamma.csv"
    rc, stdout, err = run_cli(capsys, "calibrate", "--model", "tiny", "--prompts", str(prompts),
                              "--num-samples", "1", "--steps", "4", "--width", "64", "--height", "64",
                              "--bins", "8", "--guidance-scale", "1", "--out", str(out))
    assert rc == 0, err
    assert out.is_file() and "TINY" in err
    summary = json.loads(stdout)
    assert summary["path"] == str(out.resolve()) and summary["prompts"] == 2 and summary["is_tiny"] is True
    assert summary["seeds"] == [0] and summary["rows"] == 4 and summary["bins"] == 8
    from kleinserve.engine.cns import GammaMatrix

    matrix = GammaMatrix.load_csv(out)
    assert matrix.num_bins == 8 and matrix.num_rows == 4
    assert float(matrix.values.min()) >= 0.0 and float(matrix.values.max()) <= 1.0
    assert "TINY RANDOM MODEL" in out.read_text()


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
    p = _cli("generate", "--model", "tiny", *SMALL, "--seed", "11", "--num-images", "2",
             "--output-format", "png", "--out", str(out_dir), "--negative-prompt", "blurry", "a tiny test")
    assert p.returncode == 0, p.stderr
    assert "TINY" in p.stderr
    result = FluxKleinOutput.model_validate_json(p.stdout)
    assert result.seed == 11 and len(result.images) == 2 and result.prompt == "a tiny test"
    assert len(result.has_nsfw_concepts) == 2
    for k, img in enumerate(result.images):
        path = Path(img.url)
        assert path.parent == out_dir.resolve() and path.name == f"11-{k}.png"
        assert img.file_size == os.path.getsize(path) > 0
        assert (img.width, img.height) == (64, 64)
        with Image.open(path) as im:
            assert im.size == (64, 64)
        recipe = read_recipe(path.read_bytes())
        assert recipe is not None and recipe.get("prompt") == "a tiny test"
        assert recipe["seed"] == 11 + k and recipe["negative_prompt"] == "blurry"


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


def test_calibrate_bad_settings_exit_2(tmp_path):
    p = _cli("calibrate", "--model", "tiny", "--steps", "2", "--width", "5000", "--out", str(tmp_path / "x.csv"),
             timeout=120)
    assert p.returncode == 2
    assert "--steps" in p.stderr and "--width" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x.csv").exists()
