"""The SSRF guard (service/netguard.py): every notation of a non-public address is refused, names are
resolved once and the connection goes to the checked address (Host and SNI kept), bodies and time are
bounded. Every server here listens on 127.0.0.1; test names resolve through an injected resolver."""

from __future__ import annotations

import ipaddress
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fastapi.testclient import TestClient

from kleinserve.service import jobs as J
from kleinserve.service import netguard as ng
from kleinserve.service.netguard import BlockedURL, NetPolicy
from kleinserve.service.sqlite_store import SQLiteJobStore
from kleinserve.service.store import Lease
from kleinserve.service.webhooks import WebhookDispatcher, WebhookSigner

LOOPBACK_FORMS = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0x7f.1", "0177.0.0.1", "017700000001",
                  "127.000.000.001", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "localhost",
                  "api.localhost"]
OTHER_PRIVATE = ["10.0.0.1", "10.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "0xa9fea9fe",
                 "100.64.0.1", "0.0.0.0", "0", "[::]", "224.0.0.1", "239.255.255.250", "240.0.0.1",
                 "255.255.255.255", "[fe80::1]", "[fc00::1]", "[fd12:3456::1]", "[ff02::1]",
                 "[::ffff:10.0.0.1]", "[::ffff:169.254.169.254]", "[64:ff9b::7f00:1]", "[2002:7f00:1::]",
                 "192.0.2.1", "198.18.0.1"]


@pytest.mark.parametrize("host", LOOPBACK_FORMS + OTHER_PRIVATE)
def test_every_notation_of_a_non_public_address_is_refused(host):
    url = f"http://{host}:8080/hook"
    with pytest.raises(BlockedURL, match="not a public address"):
        ng.check_url(url, NetPolicy())
    with pytest.raises(BlockedURL):
        ng.resolve_url(url, NetPolicy(resolver=lambda h, p: ["127.0.0.1"]))
    assert ng.check_url(url, NetPolicy(allow_private=True)) == url


def test_public_addresses_and_names_pass_the_literal_check():
    for url in ["https://93.184.216.34/x", "http://[2606:2800:220:1::]/x", "https://hooks.example.com/x",
                "http://8.8.8.8:8443/x"]:
        assert ng.check_url(url, NetPolicy()) == url


def test_literal_parsing_matches_inet_aton():
    assert ng.parse_ip_literal("127.1") == ipaddress.ip_address("127.0.0.1")
    assert ng.parse_ip_literal("0x7f.0.0.1") == ipaddress.ip_address("127.0.0.1")
    assert ng.parse_ip_literal("10.0x10.1") == ipaddress.ip_address("10.16.0.1")
    assert ng.parse_ip_literal("3232235777") == ipaddress.ip_address("192.168.1.1")
    for name in ["example.com", "08.1.1.1", "1.2.3.4.5", "256.1.1.1", "4294967296", "1e3"]:
        assert ng.parse_ip_literal(name) is None, name


def test_allow_cidrs_opens_only_the_listed_networks():
    policy = NetPolicy.from_options(allow_cidrs=["127.0.0.0/8", "fd00::/8"])
    assert ng.check_url("http://127.1:9/x", policy)
    assert ng.check_url("http://[::ffff:127.0.0.1]:9/x", policy)  # judged as the IPv4 it carries
    assert ng.check_url("http://[fd00::5]/x", policy)
    for refused in ["http://10.0.0.1/x", "http://169.254.169.254/x", "http://[::1]/x"]:
        with pytest.raises(BlockedURL):
            ng.check_url(refused, policy)
    with pytest.raises(ValueError, match="not an IP network"):
        NetPolicy.from_options(allow_cidrs=["10.0.0.0/33"])


def test_a_name_is_refused_when_any_address_it_resolves_to_is_private():
    policy = NetPolicy(resolver=lambda h, p: {"mixed.test": ["93.184.216.34", "127.0.0.1"],
                                              "meta.test": ["169.254.169.254"],
                                              "public.test": ["93.184.216.34"]}[h])
    with pytest.raises(BlockedURL, match="127.0.0.1"):
        ng.resolve_url("https://mixed.test/x", policy)
    with pytest.raises(BlockedURL, match="169.254.169.254"):
        ng.resolve_url("https://meta.test/x", policy)
    checked = ng.resolve_url("https://public.test/x", policy)
    assert checked.addresses == (ipaddress.ip_address("93.184.216.34"),) and checked.port == 443


def test_syntax_is_checked():
    for bad in ["ftp://example.com/x", "file:///etc/passwd", "", "/relative", "https://u:p@example.com/",
                "https://exa mple.com/", "http://[::1/x", "https:///nohost", "https://example.com/" + "a" * 3000,
                "http://example.com/\r\nx"]:
        with pytest.raises(BlockedURL):
            ng.check_url(bad, NetPolicy(allow_private=True))


# ------------------------------------------------------------------------------------ real requests

class _Server:
    def __init__(self, *, delay: float = 0.0, body: bytes = b"ok", tls: ssl.SSLContext | None = None):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                n = int(self.headers.get("content-length", "0"))
                data = self.rfile.read(n) if n else b""
                outer.requests.append({"method": self.command, "host": self.headers.get("host"),
                                       "body": data, "path": self.path})
                time.sleep(delay)
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _one_shot_resolver(mapping):
    """Answers each name once; a second lookup of the same name fails (it would be a rebinding)."""
    seen: list[str] = []

    def resolve(host, port):
        if host in seen:
            raise OSError(f"second lookup of {host}")
        seen.append(host)
        return mapping[host]

    resolve.seen = seen
    return resolve


def test_the_request_goes_to_the_checked_address_with_the_original_host_header():
    with _Server() as srv:
        resolver = _one_shot_resolver({"hook.test": ["127.0.0.1"]})
        policy = NetPolicy(allow_private=True, resolver=resolver)
        r = ng.guarded_post(f"http://hook.test:{srv.port}/in?a=1", policy=policy, content=b"{}",
                            headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.content == b"ok" and r.address == "127.0.0.1"
    assert srv.requests[0]["host"] == f"hook.test:{srv.port}" and srv.requests[0]["path"] == "/in?a=1"
    assert resolver.seen == ["hook.test"]  # looked up once; `hook.test` exists in no real DNS


def test_the_default_policy_sends_nothing_to_loopback():
    with _Server() as srv:
        for host in ("127.0.0.1", "127.1", "2130706433", "localhost", "hook.test"):
            policy = NetPolicy(resolver=lambda h, p: ["127.0.0.1"])
            with pytest.raises(BlockedURL):
                ng.guarded_post(f"http://{host}:{srv.port}/x", policy=policy, content=b"{}")
    assert srv.requests == []


def test_https_keeps_sni_and_verifies_the_certificate_for_the_name(tmp_path):
    from service_helpers import make_self_signed_cert

    cert, key = make_self_signed_cert(tmp_path, host="hook.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    with _Server(tls=server_ctx) as srv:
        policy = NetPolicy(allow_private=True, resolver=lambda h, p: {"hook.test": ["127.0.0.1"],
                                                                      "other.test": ["127.0.0.1"]}[h])
        r = ng.guarded_get(f"https://hook.test:{srv.port}/x", policy=policy, verify=client_ctx)
        assert r.status_code == 200 and srv.requests[0]["host"] == f"hook.test:{srv.port}"
        with pytest.raises(httpx.ConnectError):  # the certificate is for hook.test, not other.test
            ng.guarded_get(f"https://other.test:{srv.port}/x", policy=policy, verify=client_ctx)


def test_body_size_and_total_time_are_bounded():
    policy = NetPolicy(allow_private=True)
    with _Server(body=b"x" * (300 * 1024)) as srv:
        with pytest.raises(ng.ResponseTooLarge):
            ng.guarded_get(f"http://127.0.0.1:{srv.port}/", policy=policy, max_bytes=64 * 1024)
    with _Server(delay=5.0) as srv:
        t0 = time.monotonic()
        with pytest.raises(httpx.TimeoutException):
            ng.guarded_get(f"http://127.0.0.1:{srv.port}/", policy=policy, total_timeout=0.5)
        assert time.monotonic() - t0 < 3.0


# ------------------------------------------------------------------------------------ webhooks

def test_the_dispatcher_by_default_refuses_a_loopback_target_for_good(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    signer = WebhookSigner.from_data_dir(tmp_path)
    with _Server() as srv:
        job = store.submit(J.Job(request_id=J.new_request_id(), endpoint_id="e", owner="o", input={},
                                 webhook_url=f"http://127.1:{srv.port}/x", created_at=time.time()))
        claimed = store.claim_next("w")
        store.complete_ok(Lease.of(claimed), {"ok": True})
        d = WebhookDispatcher(store, signer, poll_interval=0.02)
        try:
            d.start()
            deadline = time.time() + 10
            while store.get(job.request_id).webhook_state != J.WEBHOOK_FAILED:
                assert time.time() < deadline
                time.sleep(0.02)
        finally:
            d.stop()
    final = store.get(job.request_id)
    assert final.webhook_attempts == 1 and "not a public address" in final.webhook_last_error
    assert srv.requests == []
    store.close()


def test_submit_refuses_a_literal_private_webhook_with_a_422(tmp_path):
    from kleinserve.api.app import create_app
    from kleinserve.service.settings import Settings

    body = {"prompt": "x", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 4}
    headers = {"Authorization": "Key k"}
    app = create_app(Settings(data_dir=tmp_path / "a", api_keys=["k"]), start_worker=False)
    with TestClient(app) as c:
        for host in ("127.1:9", "2130706433:9", "0x7f000001:9", "[::ffff:127.0.0.1]:9", "localhost:9",
                     "169.254.169.254", "10.0.0.1"):
            r = c.post("/queue/fal-ai/flux-2/klein/9b/base", params={"fal_webhook": f"http://{host}/x"},
                       json=body, headers=headers)
            assert r.status_code == 422, (host, r.text)
            assert r.json()["detail"][0]["loc"] == ["query", "fal_webhook"]
            assert "--webhook-allow-private" in r.json()["detail"][0]["msg"]
    app = create_app(Settings(data_dir=tmp_path / "b", api_keys=["k"], webhook_allow_private=True),
                     start_worker=False)
    with TestClient(app) as c:
        r = c.post("/queue/fal-ai/flux-2/klein/9b/base", params={"fal_webhook": "http://127.1:9/x"},
                   json=body, headers=headers)
        assert r.status_code == 200, r.text


def test_the_options_build_the_policy_and_name_a_bad_cidr(tmp_path):
    from kleinserve.service.settings import Settings

    s = Settings.from_sources({"data_dir": tmp_path, "webhook_allow_cidrs": ["10.20.0.0/16"]},
                              env={"KLEINSERVE_WEBHOOK_ALLOW_PRIVATE": ""})
    policy = s.net_policy()
    assert not policy.allow_private and ng.check_url("http://10.20.3.4/x", policy)
    with pytest.raises(BlockedURL):
        ng.check_url("http://10.21.0.1/x", policy)
    env = {"KLEINSERVE_WEBHOOK_ALLOW_CIDRS": "127.0.0.0/8, fd00::/8", "KLEINSERVE_WEBHOOK_ALLOW_PRIVATE": "0"}
    assert len(Settings.from_sources({"data_dir": tmp_path}, env=env).net_policy().allow_cidrs) == 2
    settings = Settings.from_sources({"data_dir": tmp_path, "webhook_allow_private": True}, env={})
    assert settings.net_policy().allow_private
    with pytest.raises(ValueError, match="--webhook-allow-cidr: not an IP network: 'example.com'"):
        Settings.from_sources({"data_dir": tmp_path, "webhook_allow_cidrs": ["example.com"]}, env={})
