"""Request body caps, enforced before a handler reads anything: JSON calls are small,
chunk uploads are bounded by the server's setting. An oversized body gets 413 and is
never held in memory, whether it declares its length or streams without one."""

from __future__ import annotations

import json

from strata.server.asgi_metrics import ASGIApp, Message, Receive, Scope, Send

JSON_LIMIT = 4 << 20  # a commit names a manifest's chunks; 10,000 ids fit in well under 1 MiB


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, upload_limit: int):
        self.app = app
        self.upload_limit = upload_limit

    def _limit(self, scope: Scope) -> int:
        path = scope["path"]
        # Binary chunk bundles, and signed metadata (thousands of layers and scopes).
        uploads = path.endswith(("/agent/chunks", "/admin/chunks", "/admin/signing/targets",
                                 "/admin/signing/root"))
        return self.upload_limit if uploads else JSON_LIMIT

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reject(send, limit)
            return
        seen = 0
        exceeded = False
        replaced = False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Stop reading here; whatever the framework answers to the cut-off
                    # body is replaced by a 413 below.
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal replaced
            if not exceeded:
                await send(message)
            elif not replaced:
                replaced = True
                await _reject(send, limit)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not replaced:
            await _reject(send, limit)


async def _reject(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"request body larger than {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
