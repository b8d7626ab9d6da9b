"""The unmodified JavaScript client (`@fal-ai/client`, pinned in tests/js/package.json) against a live
kleinserve app (tiny model), pointed at it with a `requestMiddleware` only.

Each check is one run of tests/js/client_checks.mjs (see that file for what it asserts). Skipped only
when `node` or tests/js/node_modules is missing (.ci/run installs both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from service_helpers import serve_app

pytestmark = pytest.mark.node

JS_DIR = Path(__file__).parent / "js"
KEY = "js-client-test-key"
NODE = shutil.which("node")


def _skip_reason() -> str | None:
    if NODE is None:
        return "node is not installed (bash .ci/run installs nodejs)"
    if not (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir():
        return "tests/js/node_modules is missing: run `npm ci` in tests/js (bash .ci/run does)"
    return None


if _skip_reason():
    pytest.skip(_skip_reason(), allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_engine):
    """The real app on the shared tiny engine, plain http on 127.0.0.1 (the JS client allows it)."""
    from kleinserve.api.app import create_app
    from kleinserve.service.settings import Settings

    data_dir = tmp_path_factory.mktemp("js") / "data"
    app = create_app(Settings(data_dir=data_dir, api_keys=[KEY], model="tiny"), engine=tiny_engine)
    with serve_app(app) as srv:
        yield srv


def run_check(server, name: str, timeout: float = 180.0) -> dict:
    env = dict(os.environ, KLEINSERVE_URL=server.base_url, FAL_KEY=KEY)
    env.pop("FAL_KEY_ID", None)
    env.pop("FAL_KEY_SECRET", None)
    proc = subprocess.run([NODE, "client_checks.mjs", name], cwd=JS_DIR, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"JS check {name!r} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"] is True and out["check"] == name
    return out


def test_subscribe_with_logs(server):
    out = run_check(server, "subscribe")
    assert out["statuses"][-1] == "COMPLETED" and out["logs"] > 0


def test_queue_submit_status_result(server):
    out = run_check(server, "queue")
    assert "COMPLETED" in out["statuses"]


def test_queue_stream_status(server):
    out = run_check(server, "streamStatus")
    assert out["statuses"][-1] == "COMPLETED"


def test_stream_done_resolves_to_output(server):
    out = run_check(server, "stream")
    assert out["events"] >= 1


def test_run(server):
    run_check(server, "run")


def test_cancel(server):
    run_check(server, "cancel")


def test_validation_error(server):
    run_check(server, "validation")


def test_storage_upload_roundtrip(server):
    out = run_check(server, "storage")
    assert out["url"].startswith(server.base_url + "/files/")


def test_storage_transform_input(server):
    run_check(server, "transformInput")


def test_storage_multipart_upload(server):
    out = run_check(server, "storageMultipart")
    assert out["size"] > 90 * 1024 * 1024


@pytest.fixture(scope="module")
def family_server(tmp_path_factory):
    """A server with its own tiny engine (LoRA adapters are loaded into it) for the edit/LoRA check."""
    from kleinserve.api.app import create_app
    from kleinserve.engine import load_engine
    from kleinserve.service.settings import Settings

    data_dir = tmp_path_factory.mktemp("js-family") / "data"
    engine = load_engine("tiny", device="cpu", dtype="float32")
    app = create_app(Settings(data_dir=data_dir, api_keys=[KEY], model="tiny"), engine=engine)
    with serve_app(app) as srv:
        yield srv


def test_edit_with_an_uploaded_image_and_a_lora(family_server, tmp_path, monkeypatch):
    """The JS client uploads a reference image and a LoRA file, then runs the edit/lora endpoint: the
    image equals what the engine makes directly from the same image and LoRA."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from kleinserve.engine import load_engine
    from kleinserve.engine.tiny import save_tiny_lora
    from kleinserve.engine.types import LoraFile
    from kleinserve.schema import FluxKleinEditLoraInput

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(image)
    lora = save_tiny_lora(tmp_path / "style.safetensors", layout="kohya")
    monkeypatch.setenv("EDIT_IMAGE", str(image))
    monkeypatch.setenv("LORA_FILE", str(lora))
    out = run_check(family_server, "editLora")
    assert out["imageUrl"].startswith(family_server.base_url + "/files/")
    assert (out["width"], out["height"]) == (96, 64)  # the reference's size, rounded to 16
    request = FluxKleinEditLoraInput(prompt="make it night", seed=7, num_inference_steps=4,
                                     enable_safety_checker=False, image_urls=["data:,x"],
                                     loras=[{"path": "style", "scale": 0.8}])
    direct = load_engine("tiny", device="cpu", dtype="float32").generate(
        request, reference_images=[Image.open(image).convert("RGB")], loras=[LoraFile(lora, 0.8, "style")])
    ours = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["png"]))).convert("RGB"))
    assert np.array_equal(ours, np.asarray(Image.open(io.BytesIO(direct.images[0].data)).convert("RGB")))
