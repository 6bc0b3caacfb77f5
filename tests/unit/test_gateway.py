"""The Fleet gateway in front of the SuperLink: what it forwards, as sent, and what it refuses.

The SuperLink side is a real HTTP server on loopback (uvicorn in a thread) that echoes what
reached it; the deployment test (tests/e2e/test_deploy.py) puts the gateway before a real
SuperLink and replays an outsider.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fedtl.deploy.gateway import gateway_app


async def _echo(request: Request) -> Response:
    seen = {"path": request.url.path, "query": str(request.url.query), "headers": dict(request.headers),
            "body": (await request.body()).decode()}
    return Response(json.dumps(seen), status_code=201, media_type="application/x-echo")


@pytest.fixture(scope="module")
def superlink() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/{p:path}", _echo, methods=["POST"])]),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _call(upstream: str, method: str, path: str, max_body: int = 1000, **kwargs: object) -> httpx.Response:
    async def go() -> httpx.Response:
        app = gateway_app(upstream, verify=False, max_body=max_body)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://gateway") as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


def test_a_fleet_call_is_forwarded_as_sent(superlink: str) -> None:
    headers = {"flwr-public-key": "a2V5", "flwr-signature": "c2ln", "flwr-timestamp": "2026-12-03T00:00:00",
               "content-type": "application/protobuf", "proxy-authorization": "Basic c2VjcmV0"}
    reply = _call(superlink, "POST", "/v1/fleet/pull-messages?x=1", content=b"\x08\x01", headers=headers)
    assert reply.status_code == 201 and reply.headers["content-type"] == "application/x-echo"
    seen = reply.json()
    assert (seen["path"], seen["query"], seen["body"]) == ("/v1/fleet/pull-messages", "x=1", "\x08\x01")
    for key in ("flwr-public-key", "flwr-signature", "flwr-timestamp", "content-type"):
        assert seen["headers"][key] == headers[key], key  # node authentication signs these
    assert seen["headers"]["host"] != "gateway"  # its own connection's, not the caller's
    assert "proxy-authorization" not in seen["headers"]  # meant for the gateway's hop alone


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/control/register-node"), ("POST", "/v1/control/list-nodes"), ("POST", "/v1/runtime/pull-messages"),
    ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/v1/fleet/get-run"), ("POST", "/v1/fleetx/get-run"),
])
def test_everything_but_the_fleet_api_is_not_there(superlink: str, method: str, path: str) -> None:
    reply = _call(superlink, method, path)
    assert reply.status_code == 404 and "serves only Flower's Fleet API" in reply.text


def test_a_body_over_the_bound_is_refused_unread(superlink: str) -> None:
    assert _call(superlink, "POST", "/v1/fleet/push-object", content=b"\0" * 1001).status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted as it arrives
        for _ in range(2):
            yield b"\0" * 600
    assert _call(superlink, "POST", "/v1/fleet/push-object", content=chunks()).status_code == 413
    assert _call(superlink, "POST", "/v1/fleet/push-object", content=b"\0" * 1000).status_code == 201


def test_a_superlink_that_does_not_answer_is_a_502_that_says_so() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    reply = _call(f"http://127.0.0.1:{port}", "POST", "/v1/fleet/get-run", content=b"")
    assert reply.status_code == 502 and "the SuperLink did not answer" in reply.text
