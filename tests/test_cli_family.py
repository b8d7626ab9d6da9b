"""`kleinserve generate --endpoint ...`: the edit and LoRA endpoints' fields as flags, local files as
inputs, bad inputs as exit 2 naming the item. In-process runs of `cli.main` on the real tiny model."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from kleinserve import cli
from kleinserve.engine.tiny import save_tiny_lora
from kleinserve.engine.types import LoraFile
from kleinserve.schema import EDIT_ENDPOINT_ID, EDIT_LORA_ENDPOINT_ID, FluxKleinEditLoraInput

TINY = ("--model", "tiny", "--device", "cpu", "--dtype", "float32", "--no-progress")


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-family")
    rng = np.random.default_rng(7)
    image = d / "in.png"
    Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(image)
    return {"image": image, "lora": save_tiny_lora(d / "style.safetensors", layout="diffusers"), "dir": d}


def test_help_follows_the_endpoint(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--endpoint", EDIT_LORA_ENDPOINT_ID, "--help"])
    out = capsys.readouterr().out
    assert "--image-urls URL|PATH [URL|PATH ...]" in out and "--loras JSON" in out
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "--image-urls" not in out and "--endpoint ENDPOINT_ID" in out


def test_edit_with_a_local_file_and_a_lora(capsys, files, tiny_engine):
    out_dir = files["dir"] / "out"
    loras = json.dumps([{"path": str(files["lora"]), "scale": 0.8}])
    rc, out, err = run(capsys, "generate", "--endpoint", EDIT_LORA_ENDPOINT_ID, "make it blue", *TINY,
                       "--image-urls", str(files["image"]), "--loras", loras, "--seed", "4",
                       "--num-inference-steps", "4", "--no-enable-safety-checker", "--out", str(out_dir))
    assert rc == 0, err
    output = json.loads(out)
    image = output["images"][0]
    assert (image["width"], image["height"]) == (96, 64)  # the input's size, floored to 16
    assert "1 reference image(s) (96x64)" in err and "style.safetensors (scale 0.8)" in err
    ours = np.asarray(Image.open(image["url"]).convert("RGB")).astype(np.int16)

    # the same request straight on an engine: the same image
    from kleinserve.engine import load_engine

    engine = load_engine("tiny", device="cpu", dtype="float32")
    request = FluxKleinEditLoraInput(prompt="make it blue", image_urls=["data:,x"], seed=4, num_inference_steps=4,
                                     enable_safety_checker=False, loras=[{"path": str(files["lora"]), "scale": 0.8}])
    direct = engine.generate(request, reference_images=[Image.open(files["image"]).convert("RGB")],
                             loras=[LoraFile(files["lora"], 0.8, "style")])
    assert np.array_equal(ours, np.asarray(Image.open(io.BytesIO(direct.images[0].data)).convert("RGB")))


@pytest.mark.parametrize("argv,needle", [
    (["--endpoint", EDIT_ENDPOINT_ID, "--image-urls", "/no/such.png"], "--image-urls[0]: no such file: /no/such.png"),
    (["--endpoint", EDIT_ENDPOINT_ID], "--image-urls: Field required"),
    (["--endpoint", EDIT_LORA_ENDPOINT_ID, "--image-urls", "IMAGE", "--loras", "[{\"path\": \"IMAGE\"}]"],
     "--loras[0]: path: not a safetensors file"),
    (["--endpoint", EDIT_LORA_ENDPOINT_ID, "--image-urls", "IMAGE", "--loras", "{oops"], "--loras: not valid JSON"),
    (["--endpoint", EDIT_ENDPOINT_ID, "--image-urls", "TEXT"], "--image-urls[0]: not an image"),
])
def test_bad_inputs_exit_2_naming_the_item(capsys, files, argv, needle):
    text = files["dir"] / "notes.txt"
    text.write_text("hello")
    argv = [a.replace("IMAGE", str(files["image"])).replace("TEXT", str(text)) for a in argv]
    rc, out, err = run(capsys, "generate", "x", *TINY, *argv)
    assert rc == 2, err
    assert needle in err
    assert out == ""


def test_edit_fields_are_not_flags_of_the_base_endpoint(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "x", "--image-urls", "a.png"])
    assert info.value.code == 2


def test_a_distilled_endpoint_gets_its_family_model(capsys, monkeypatch):
    """--model auto follows the endpoint's family: on a CPU box, the tiny distilled twin."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    rc, out, err = run(capsys, "generate", "--endpoint", "fal-ai/flux-2/klein/9b", "a fox", "--device", "cpu",
                       "--dtype", "float32", "--no-progress", "--sync-mode", "--image-size", "64x64",
                       "--no-enable-safety-checker", "--seed", "1")
    assert rc == 0, err
    assert "model: tiny-distilled" in err and "cfg_batched" not in err
    assert json.loads(out)["images"][0]["width"] == 64
    with pytest.raises(SystemExit) as info:  # not a field of the distilled endpoints
        cli.main(["generate", "--endpoint", "fal-ai/flux-2/klein/9b", "a fox", "--guidance-scale", "3"])
    assert info.value.code == 2
