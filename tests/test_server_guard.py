"""The Prefect server that ``sparseflow server`` starts is not reachable from a web page: real HTTP
requests against a real server refuse a foreign Origin, a foreign Host (DNS rebinding), and,
with Prefect's API authentication set, a request without credentials."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from flows.server import wait_until_healthy
from tests.conftest import _free_port, terminate


def _request(url: str, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None):
    """(status, headers, body) of one request; ``headers`` may override ``Host``."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
    headers = dict(headers or {})
    conn.putrequest(method, path, skip_host="Host" in headers)
    for k, v in headers.items():
        conn.putheader(k, v)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    r = conn.getresponse()
    out = (r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    conn.close()
    return out


def _flow_names(url: str, headers: dict[str, str] | None = None) -> list[str]:
    status, _, body = _request(url, "POST", "/api/flows/filter", {"Content-Type": "application/json", **(headers or {})}, b"{}")
    assert status == 200, body
    return [f["name"] for f in json.loads(body)]


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1.evil.example", "https://127.0.0.1"])
def test_a_foreign_origin_is_refused(prefect_server, origin):
    own = f"http://127.0.0.1:{urlparse(prefect_server).port}"
    # Preflight of a cross-site JSON POST: refused, and no CORS header lets the page read anything.
    status, headers, _ = _request(prefect_server, "OPTIONS", "/api/flows/", {"Origin": origin, "Access-Control-Request-Method": "POST"})
    assert status == 403 and "access-control-allow-origin" not in headers
    # A "simple" cross-site POST (text/plain: no preflight in a browser) is refused before Prefect sees it.
    name = "created-from-a-web-page"
    status, _, _ = _request(prefect_server, "POST", "/api/flows/", {"Origin": origin, "Content-Type": "text/plain"},
                            json.dumps({"name": name}).encode())  # fmt: skip
    assert status == 403 and name not in _flow_names(prefect_server)
    # The server's own origin (its UI) is allowed, with the CORS header naming it, not "*".
    status, headers, _ = _request(prefect_server, "OPTIONS", "/api/flows/", {"Origin": own, "Access-Control-Request-Method": "POST"})
    assert status == 200 and headers["access-control-allow-origin"] == own


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io:{port}", ""])
def test_a_foreign_host_is_refused(prefect_server, host):
    port = urlparse(prefect_server).port
    status, _, body = _request(prefect_server, "GET", "/api/health", {"Host": host.format(port=port)})
    assert status == 400 and b"is not this server's" in body
    for own in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert _request(prefect_server, "GET", "/api/health", {"Host": own})[0] == 200


def test_with_auth_set_a_request_without_credentials_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    port = _free_port()
    sparseflow = shutil.which("sparseflow", path=str(Path(sys.executable).parent)) or "sparseflow"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_API_AUTH_STRING": "admin:s3cret"}
    env.pop("PREFECT_API_URL", None)
    url = f"http://127.0.0.1:{port}/api"
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen([sparseflow, "server", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_healthy(url, proc, tmp_path / "server.log")
            good = {"Authorization": "Basic " + base64.b64encode(b"admin:s3cret").decode()}
            wrong = {"Authorization": "Basic " + base64.b64encode(b"admin:guess").decode()}
            for headers in ({}, wrong, {"Authorization": "Bearer admin:s3cret"}):
                status, _, _ = _request(url, "POST", "/api/flows/filter", {"Content-Type": "application/json", **headers}, b"{}")
                assert status == 401, headers
            assert _flow_names(url, good) == []
            # A Prefect client with the matching setting works (what workers and stages use).
            code = ("from prefect.client.orchestration import get_client\n"
                    "with get_client(sync_client=True) as c: print(len(c.read_flows()))")  # fmt: skip
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                 env={**env, "PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": "admin:s3cret"})  # fmt: skip
            assert out.returncode == 0 and out.stdout.strip() == "0", out.stderr[-2000:]
        finally:
            terminate(proc)
