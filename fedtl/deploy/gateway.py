"""The SuperLink's public door: a TLS front that forwards Flower's Fleet API and nothing else.

Flower 1.42 serves three APIs on the SuperLink's one port: the Fleet API (``/v1/fleet/``, the
SuperNodes), the Control API (``/v1/control/``: register, unregister and list nodes, start runs;
open-source Flower authenticates no account there) and the Runtime API (``/v1/runtime/``, its
SuperExec). It has no flag to serve them apart, to require client certificates, or to bound a
request. So ``fedtl deploy superlink`` runs the SuperLink on loopback and this gateway on the
address the nodes reach: a ``POST`` under ``/v1/fleet/`` is forwarded with its headers and body as
sent (node authentication signs them, and the SuperLink checks the signature); any other path is
refused (404), and a body over ``max_body`` bytes too (413) before it is read whole.

Hand-written on Starlette, httpx and uvicorn (Flower's own HTTP stack) because no Python library
filters Flower's protobuf-over-HTTP API; a reverse proxy (nginx, with ``location /v1/fleet/`` and
``client_max_body_size``) does the same job where one is run instead (docs/deploy.md).
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fedtl.deploy.certs import Keys

FLEET = "/v1/fleet/"
# Flower sends arrays in chunks of 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE), one chunk a request,
# whatever the model's size: no request of a SuperNode needs more than this.
MAX_BODY = 16 * 2**20
# Per connection, not end to end (RFC 9110 7.6.1); the length is the forwarder's own. A reply's body
# arrives decoded (httpx), so its content-encoding goes too; a request's is forwarded as it came.
HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding",
       "upgrade", "host", "content-length"}
DECODED = HOP | {"content-encoding"}
NOT_HERE = ("not served here: this address serves only Flower's Fleet API (SuperNodes). The Control API "
            "(flwr run, flwr supernode register/list/unregister) is on the SuperLink's machine, at its control port\n")


def gateway_app(upstream: str, *, verify: ssl.SSLContext | bool, max_body: int = MAX_BODY) -> Starlette:
    """An ASGI app forwarding Fleet API calls to the SuperLink at ``upstream``.

    Parameters
    ----------
    upstream : str
        The SuperLink's base URL on loopback (``https://127.0.0.1:9093``).
    verify : ssl.SSLContext or bool
        How to check the SuperLink's certificate (the federation's CA); ``False`` only without TLS.
    max_body : int
        Largest request body forwarded, in bytes.
    """
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=httpx.Timeout(120.0, connect=10.0))

    async def forward(request: Request) -> Response:
        if request.method != "POST" or not request.url.path.startswith(FLEET):
            return PlainTextResponse(NOT_HERE, status_code=404)
        too_big = PlainTextResponse(f"request body over {max_body} bytes: refused\n", status_code=413)
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > max_body:
            return too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                return too_big
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP]
        try:
            reply = await client.post(request.url.path, params=request.query_params, content=bytes(body),
                                      headers=headers)
        except httpx.HTTPError as err:
            return PlainTextResponse(f"the SuperLink did not answer: {err}\n", status_code=502)
        return Response(reply.content, status_code=reply.status_code,
                        headers={k: v for k, v in reply.headers.items() if k.lower() not in DECODED})

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def serve_gateway(host: str, port: int, control_port: int, keys: Keys | None, max_body: int = MAX_BODY) -> None:
    """Serve the gateway on ``host:port`` for the SuperLink on ``127.0.0.1:control_port`` until a signal
    ends it: TLS with the SuperLink's own certificate, checked against the federation's CA, from
    ``keys`` (``None``: plain HTTP both ways, ``--insecure``)."""
    import uvicorn

    scheme, verify = ("https", ssl.create_default_context(cafile=keys.ca)) if keys else ("http", False)
    app = gateway_app(f"{scheme}://127.0.0.1:{control_port}", verify=verify, max_body=max_body)
    uvicorn.run(app, host=host, port=port, ssl_certfile=str(keys.server_cert) if keys else None,
                ssl_keyfile=str(keys.server_key) if keys else None, access_log=True, log_level="info", workers=1)


def _end_with_parent() -> None:
    # In the child, before exec: SIGTERM it when its parent dies, even by SIGKILL (Linux's prctl).
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


def run_behind_gateway(superlink: list[str], *, control_port: int, host: str, port: int, keys: Keys | None,
                       max_body: int = MAX_BODY) -> int:
    """Run ``superlink`` (listening on ``127.0.0.1:control_port``) and the gateway on ``host:port`` in
    front of it, until a signal ends this process or the SuperLink exits; the SuperLink's exit code
    if it ended first, else 0. The SuperLink ends with this process, however this one ends."""
    link = subprocess.Popen(superlink, preexec_fn=_end_with_parent)  # noqa: PLW1509 - prctl only, no locks
    stopping, ended_first = threading.Event(), threading.Event()

    def watch() -> None:
        link.wait()
        if not stopping.is_set():
            ended_first.set()
            os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down on it

    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # uvicorn re-raises it once it has stopped
    code = 0
    try:
        if not _wait_listening(control_port, link):
            link.poll()
            return link.returncode if link.returncode is not None else 1
        threading.Thread(target=watch, daemon=True).start()
        serve_gateway(host, port, control_port, keys, max_body)
    except SystemExit as err:  # a signal (0), or uvicorn could not start (its port taken: 3)
        code = err.code if isinstance(err.code, int) else 1
    finally:
        stopping.set()
        signal.signal(signal.SIGTERM, previous)
        if link.poll() is None:
            link.terminate()
            try:
                link.wait(timeout=20)
            except subprocess.TimeoutExpired:
                link.kill()
                link.wait()
    return (link.returncode or 1) if ended_first.is_set() else code
