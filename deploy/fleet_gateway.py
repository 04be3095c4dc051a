"""Fleet-only TLS gateway in front of a MedMerge SuperLink (started by start_superlink.sh).

Flower 1.42's SuperLink serves its Fleet, Control and ServerAppIo (Runtime) APIs from one
HTTPS server (`--host`/`--port`; `--fleet-api-address` and `--control-api-address` are
deprecated and ignored), and the open-source Control API has no login. start_superlink.sh
therefore binds that server to 127.0.0.1 only and runs this gateway on the public address.

The gateway terminates TLS with the SuperLink's own certificate and forwards exactly two kinds
of request to the SuperLink (over TLS, verified against the CA):
  - POST /v1/fleet/<method>   the Fleet API, which is all a SuperNode ever calls;
  - GET or HEAD /health       readiness, no content.
Anything else (the Control API, the Runtime API, /docs, a query string, a percent-encoded or
dot-segment path) is answered 404 here and never reaches the SuperLink. The SuperLink still
authenticates every Fleet call itself (--enable-supernode-auth): the gateway changes no header.

Usage: python deploy/fleet_gateway.py --listen HOST:PORT --upstream-port PORT --certs CERT_DIR
"""

from __future__ import annotations

import argparse
import logging
import re
import ssl
import sys
from pathlib import Path

import httpx
import uvicorn

LOG = logging.getLogger("fleet-gateway")
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z0-9-]{0,63}")
# Hop-by-hop headers (RFC 9110 7.6.1) and Host are the gateway's own; the rest pass unchanged.
HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    )
)


def allowed(scope: dict) -> bool:
    """Only a literal Fleet call or a health check, with nothing that could be re-read."""
    path, method = scope["path"], scope["method"]
    raw = scope.get("raw_path")
    if (raw is not None and raw != path.encode("ascii", "replace")) or scope["query_string"]:
        return False  # percent-encoding or a query string: no Fleet call has either
    if method == "POST" and FLEET_PATH.fullmatch(path):
        return True
    return method in ("GET", "HEAD") and path == "/health"


async def read_body(receive, limit: int) -> bytes | None:
    """The whole request body, or None when it is larger than `limit` bytes."""
    body = bytearray()
    more = True
    while more:
        event = await receive()
        if event["type"] == "http.disconnect":
            raise ConnectionAbortedError
        body += event.get("body", b"")
        more = event.get("more_body", False)
        if len(body) > limit:
            return None
    return bytes(body)


async def reply(send, status: int, text: str) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class FleetGateway:
    """ASGI app: forward allowed requests to the SuperLink, refuse the rest."""

    def __init__(self, upstream: str, ca_certfile: str, max_body: int) -> None:
        self.upstream = upstream
        self.verify = ssl.create_default_context(cafile=ca_certfile)
        self.max_body = max_body
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http":
            await self.http(scope, receive, send)
        # websockets are not served: uvicorn closes them when the app returns

    async def lifespan(self, receive, send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                self.client = httpx.AsyncClient(
                    verify=self.verify,
                    timeout=httpx.Timeout(300.0, connect=10.0),
                    limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
                )
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope, receive, send) -> None:
        client = scope.get("client") or ("?", 0)
        if not allowed(scope):
            target = scope.get("raw_path") or scope["path"].encode()
            LOG.warning("refused %s %r from %s", scope["method"], target[:200], client[0])
            await reply(send, 404, "Not Found")
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        length = dict(headers).get(b"content-length", b"0")
        if not length.isdigit():
            await reply(send, 400, "Bad Request")
            return
        if int(length) > self.max_body:
            await reply(send, 413, "Request Entity Too Large")
            return
        try:
            body = await read_body(receive, self.max_body)
        except ConnectionAbortedError:
            return
        if body is None:
            await reply(send, 413, "Request Entity Too Large")
            return
        assert self.client is not None
        request = self.client.build_request(
            scope["method"], self.upstream + scope["path"], headers=headers, content=body
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException:
            await reply(send, 504, "SuperLink timed out")  # a SuperNode retries a 504
            return
        except httpx.TransportError as exc:
            LOG.warning("SuperLink unreachable: %s", exc)
            await reply(send, 502, "SuperLink unavailable")  # ... and a 502
            return
        try:
            out = [(k.lower(), v) for k, v in response.headers.raw]
            out = [(k, v) for k, v in out if k not in HOP_BY_HOP]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": out}
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


def split_address(address: str) -> tuple[str, int]:
    """'10.0.0.5:9092' or '[2001:db8::5]:9092' -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="public HOST:PORT for SuperNodes")
    parser.add_argument(
        "--upstream-port", type=int, required=True, help="the SuperLink's port on 127.0.0.1"
    )
    parser.add_argument(
        "--certs", type=Path, required=True, help="folder with ca.crt, server.pem, server.key"
    )
    parser.add_argument(
        "--max-body-mib",
        type=int,
        default=256,
        help="largest request forwarded (Flower sends arrays in 5 MiB chunks)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",  # one log file, timestamps
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per heartbeat
    try:
        host, port = split_address(args.listen)
    except ValueError as exc:
        parser.error(str(exc))
    app = FleetGateway(
        f"https://127.0.0.1:{args.upstream_port}",
        str(args.certs / "ca.crt"),
        args.max_body_mib * 1024 * 1024,
    )
    LOG.info(
        "Fleet API on https://%s:%d -> SuperLink https://127.0.0.1:%d (Fleet calls only)",
        host,
        port,
        args.upstream_port,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=str(args.certs / "server.pem"),
        ssl_keyfile=str(args.certs / "server.key"),
        access_log=False,
        server_header=False,
        date_header=False,  # the SuperLink's own Date header passes through
        proxy_headers=False,
        lifespan="on",
        log_level="warning",
        workers=1,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
