"""ASGI middleware: every /v1 response names the engine's numerics mode (specserve/engine/numerics.py).

A client comparing outputs across servers, or a test of determinism, can then tell from the response
alone whether greedy output is promised to equal plain decoding and whether a seed reproduces it.
Pure ASGI (no BaseHTTPMiddleware), so streaming responses and disconnect detection pass through untouched.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specserve.engine.numerics import HEADER


class NumericsHeader:
    def __init__(self, app: ASGIApp, value: str) -> None:
        self.app = app
        self.header = (HEADER.lower().encode("latin-1"), value.encode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)
