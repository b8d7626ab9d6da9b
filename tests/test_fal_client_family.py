"""The REAL Python `fal_client` runs the edit and LoRA endpoints: it uploads an image and a LoRA file
to our storage (`fal_client.upload_file` / `upload`), then passes their URLs as `image_urls` and
`loras[].path`; the server reads them from its storage. The images equal the engine's own for the same
inputs; a bad input is the client's FalClientHTTPError 422 naming the item. (Uses the main line's app
services: runs after this branch is merged there; checked in a trial merge.)"""

from __future__ import annotations

import io
import json
import ssl
import textwrap

import httpx
import numpy as np
import pytest
from PIL import Image

from kleinserve.api.app import create_app
from kleinserve.engine.tiny import save_tiny_lora
from kleinserve.engine.types import LoraFile
from kleinserve.schema import FluxKleinEditLoraInput
from kleinserve.service.settings import Settings
from service_helpers import fal_client_env, make_self_signed_cert, run_fal_client_script, serve_app

pytest.importorskip("fal_client")

KEY = "fal-client-family-key"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from kleinserve.engine import load_engine

    tmp = tmp_path_factory.mktemp("falfamily")
    image = tmp / "photo.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(image)
    lora = save_tiny_lora(tmp / "style.safetensors", layout="kohya")
    engine = load_engine("tiny", device="cpu", dtype="float32")  # its own: adapters stay in it
    cert, key = make_self_signed_cert(tmp / "tls")
    app = create_app(Settings(data_dir=tmp / "data", api_keys=[KEY]), engine=engine)
    with serve_app(app, ssl_cert=cert, ssl_key=key) as srv:
        code = textwrap.dedent(f"""
            import json
            import fal_client, fal_client.client as C
            from fal_client import FalClientHTTPError
            C.REST_URL = {srv.base_url!r}
            C.CDN_URL = {srv.base_url!r}
            image_url = fal_client.upload_file({str(image)!r})
            lora_url = fal_client.upload(open({str(lora)!r}, "rb").read(), "application/octet-stream",
                                         file_name="style.safetensors")
            common = {{"prompt": "make it night", "seed": 7, "num_inference_steps": 4,
                      "enable_safety_checker": False}}
            report = {{"image_url": image_url, "lora_url": lora_url}}
            report["edit"] = fal_client.subscribe("fal-ai/flux-2/klein/9b/base/edit/lora", with_logs=True,
                arguments={{**common, "image_urls": [image_url], "loras": [{{"path": lora_url, "scale": 0.8}}]}})
            try:
                fal_client.run("fal-ai/flux-2/klein/9b/base/edit",
                               arguments={{**common, "image_urls": [image_url, lora_url]}})
                report["bad"] = None
            except FalClientHTTPError as e:
                report["bad"] = {{"status": e.status_code, "message": e.message}}
            print("REPORT " + json.dumps(report))
        """)
        proc = run_fal_client_script(code, fal_client_env(srv.host_port, KEY, cert), timeout=600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
        assert proc.returncode == 0 and lines, f"client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        report = json.loads(lines[-1][len("REPORT "):])
        verify = ssl.create_default_context(cafile=str(cert))
        report["edit_png"] = httpx.get(report["edit"]["images"][0]["url"], verify=verify).content
    return report, image, lora


def test_edit_with_uploaded_image_and_lora(setup):
    from kleinserve.engine import load_engine

    report, image, lora = setup
    out = report["edit"]
    assert (out["images"][0]["width"], out["images"][0]["height"]) == (96, 64)
    engine = load_engine("tiny", device="cpu", dtype="float32")
    request = FluxKleinEditLoraInput(prompt="make it night", seed=7, num_inference_steps=4, enable_safety_checker=False,
                                     image_urls=["data:,x"], loras=[{"path": "style", "scale": 0.8}])
    direct = engine.generate(request, reference_images=[Image.open(image).convert("RGB")],
                             loras=[LoraFile(lora, 0.8, "style")])
    ours = np.asarray(Image.open(io.BytesIO(report["edit_png"])).convert("RGB"))
    assert np.array_equal(ours, np.asarray(Image.open(io.BytesIO(direct.images[0].data)).convert("RGB")))


def test_bad_input_is_a_422_naming_the_item(setup):
    report, _, _ = setup
    assert report["bad"]["status"] == 422
    assert "image_urls[1]: not an image" in json.dumps(report["bad"]["message"])
