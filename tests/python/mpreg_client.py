"""A small asyncio client for mpreg nodes, written from docs/PROTOCOL.md.

It speaks the client side of the wire protocol: JSON objects over one
WebSocket connection, several requests in flight matched by their id `u`.

    async with await Client.connect("ws://127.0.0.1:7773") as client:
        r = await client.request([
            Command("first", "echo", ["hi there!"]),
            Command("second", "echo", ["first"]),
        ])
        assert r == {"second": "hi there!"}

Needs the `websockets` package (PyPI), 15.0 or newer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

__all__ = [
    "Client",
    "Command",
    "ConnectionLost",
    "MpregError",
    "ProtocolViolation",
]

# The node accepts messages up to its `max_message_size` (64 MiB by default);
# accept replies as large on this side.
MAX_MESSAGE_SIZE = 64 << 20

# mpreg's clients mark flat-envelope requests with this field, so that
# replies take mpreg's form (string `error.code`, `r` with every sink). A
# flat request without it gets the form of the original project's later
# client instead (docs/PROTOCOL.md, "Two reply forms").
MARKER = "mpreg"
MARKER_VERSION = 1


class MpregError(Exception):
    """An error reply from the node: `{"code", "kind", "message", "command", "details"}`.

    `code` here is mpreg's string code, read from `kind` (present in both
    reply forms); `number` is the original's numeric code when the reply
    was in the later client's form, else None.
    """

    def __init__(
        self,
        code: str,
        message: str,
        command: str | None = None,
        details: Any = None,
        u: Any = None,
        number: int | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.command = command
        self.details = details
        self.u = u
        self.number = number
        where = f" (command {command!r})" if command is not None else ""
        super().__init__(f"{code}: {message}{where}")

    @classmethod
    def from_reply(cls, error: Any, u: Any) -> "MpregError":
        """Builds the exception from a reply's `error` object."""
        if not isinstance(error, dict):
            raise ProtocolViolation(f"reply {u!r}: `error` is not an object: {error!r}")
        raw = error.get("code")
        kind = error.get("kind")
        return cls(
            code=str(kind if isinstance(kind, str) else raw),
            message=str(error.get("message", "")),
            command=error.get("command"),
            details=error.get("details"),
            u=u,
            number=raw if isinstance(raw, int) and not isinstance(raw, bool) else None,
        )


class ConnectionLost(Exception):
    """The connection closed; carries the close code and reason when known."""

    def __init__(self, code: int | None, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"connection closed (code {code}, reason {reason!r})")


class ProtocolViolation(Exception):
    """The node sent something this page's protocol does not allow."""


@dataclass
class Command:
    """One command of a request.

    An element of `args`, or a value of `kwargs`, that is a string equal to
    the name of another command of the same request is replaced by that
    command's result.
    """

    name: str
    fun: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    locs: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "fun": self.fun, "args": list(self.args)}
        if self.kwargs:
            out["kwargs"] = dict(self.kwargs)
        out["locs"] = list(self.locs)
        return out


class Client:
    """One connection to a node; safe to use from many tasks at once."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        # Replies that match no request in flight (`u` null or unknown), in
        # arrival order: a malformed message's reply lands here.
        self.unmatched: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._closed: ConnectionLost | None = None
        self._reader = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        token: str | None = None,
        token_via: str = "header",
        open_timeout: float = 10.0,
    ) -> "Client":
        """Opens a connection.

        `token_via` says how the token is presented: `"header"`
        (`Authorization: Bearer TOKEN` on the upgrade request), `"query"`
        (`?token=TOKEN` on the URL) or `"message"` (a first message
        `{"role": "auth", "token": TOKEN}`, whose answer is awaited here).
        A refused token raises `MpregError` with code `unauthorized`.
        """
        headers = None
        if token is not None:
            if token_via == "header":
                headers = {"Authorization": f"Bearer {token}"}
            elif token_via == "query":
                sep = "&" if "?" in url else "?"
                url = f"{url}{sep}token={quote(token, safe='')}"
            elif token_via != "message":
                raise ValueError(f"token_via must be header, query or message, not {token_via!r}")
        ws = await connect(
            url,
            additional_headers=headers,
            max_size=MAX_MESSAGE_SIZE,
            open_timeout=open_timeout,
            # Straight to the node, whatever proxy the environment names.
            proxy=None,
            # Nodes negotiate no extension (docs/PROTOCOL.md, Frames).
            compression=None,
        )
        if token is not None and token_via == "message":
            try:
                await cls._authenticate(ws, token, open_timeout)
            except BaseException:
                await ws.close()
                raise
        return cls(ws)

    @staticmethod
    async def _authenticate(ws: ClientConnection, token: str, timeout: float) -> None:
        await ws.send(json.dumps({"role": "auth", "token": token}))
        try:
            raw = await asyncio.wait_for(ws.recv(), timeout)
        except ConnectionClosed as e:
            raise _lost(e) from None
        reply = _decode(raw)
        if reply.get("role") == "auth" and reply.get("ok") is True:
            return
        if reply.get("error") is not None:
            raise MpregError.from_reply(reply["error"], reply.get("u"))
        raise ProtocolViolation(f"unexpected answer to auth: {reply!r}")

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connection; requests still in flight fail with `ConnectionLost`."""
        await self._ws.close()
        await self._reader

    async def wait_closed(self, timeout: float) -> ConnectionLost:
        """Waits (at most `timeout` seconds) until the node closes the connection."""
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        # The reader sets `_closed` before it ends.
        return self._closed or ConnectionLost(None, "")

    def next_id(self) -> str:
        """A request id not used before on this connection."""
        return f"py-{next(self._ids)}"

    @staticmethod
    def build(
        cmds: Iterable[Command],
        u: Any,
        *,
        timeout_ms: int | None = None,
        return_intermediate_results: bool = False,
        include_execution_summary: bool = False,
        nested: bool = False,
        marker: bool = True,
    ) -> dict[str, Any]:
        """A request message, in the flat envelope or nested under `rpc`.

        A flat request carries mpreg's marker unless `marker` is False (as
        the original project's later client sends it).
        """
        body: dict[str, Any] = {"u": u, "cmds": [c.to_json() for c in cmds]}
        if timeout_ms is not None:
            body["timeout_ms"] = timeout_ms
        if return_intermediate_results:
            body["return_intermediate_results"] = True
        if include_execution_summary:
            body["include_execution_summary"] = True
        if nested:
            return {"role": "rpc", "rpc": body}
        if marker:
            return {"role": "rpc", MARKER: MARKER_VERSION, **body}
        return {"role": "rpc", **body}

    async def send(
        self, message: dict[str, Any], *, binary: bool = False, timeout: float | None = None
    ) -> dict[str, Any]:
        """Sends one request message (carrying its `u`) and returns the whole reply."""
        u = message.get("u", message.get("rpc", {}).get("u"))
        if u is None:
            raise ValueError("a request needs an id `u`")
        if u in self._pending:
            raise ValueError(f"request id {u!r} is already in flight")
        if self._closed is not None:
            raise self._closed
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[u] = waiter
        try:
            text = json.dumps(message)
            await self._send_frame(text.encode() if binary else text)
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        finally:
            self._pending.pop(u, None)

    async def request(
        self,
        cmds: Iterable[Command],
        *,
        timeout_ms: int | None = None,
        return_intermediate_results: bool = False,
        nested: bool = False,
        marker: bool = True,
        u: Any = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Runs a request; returns `r` (sink name → result) or raises `MpregError`."""
        u = self.next_id() if u is None else u
        msg = self.build(
            cmds,
            u,
            timeout_ms=timeout_ms,
            return_intermediate_results=return_intermediate_results,
            nested=nested,
            marker=marker,
        )
        reply = await self.send(msg, timeout=timeout)
        return self.result(reply)

    async def call(
        self, fun: str, *args: Any, locs: Iterable[str] = (), timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Runs one function and returns its result."""
        r = await self.request(
            [Command("call", fun, list(args), kwargs, list(locs))], timeout=timeout
        )
        return r["call"]

    @staticmethod
    def result(reply: dict[str, Any]) -> dict[str, Any]:
        """The `r` of a reply, or the `MpregError` its `error` describes."""
        if reply.get("error") is not None:
            raise MpregError.from_reply(reply["error"], reply.get("u"))
        r = reply.get("r")
        if not isinstance(r, dict):
            raise ProtocolViolation(f"reply without error has no `r` object: {reply!r}")
        return r

    async def send_raw(self, data: str | bytes, *, timeout: float) -> dict[str, Any]:
        """Sends any frame, e.g. malformed JSON, and returns the next reply
        that matches no request in flight (such as the reply with `u` null)."""
        await self._send_frame(data)
        return await asyncio.wait_for(self.unmatched.get(), timeout)

    async def _send_frame(self, data: str | bytes) -> None:
        try:
            await self._ws.send(data)
        except ConnectionClosed as e:
            raise _lost(e) from None

    async def _read_loop(self) -> None:
        try:
            async for raw in self._ws:
                reply = _decode(raw)
                # Ids are JSON strings or numbers: the echoed `u` decodes to
                # the same Python value (and hash) as the one sent.
                u = reply.get("u")
                waiter = self._pending.get(u) if isinstance(u, (str, int, float)) else None
                if waiter is not None and not waiter.done():
                    waiter.set_result(reply)
                else:
                    self.unmatched.put_nowait(reply)
            self._closed = _lost_from(self._ws)
        except ConnectionClosed as e:
            self._closed = _lost(e)
        except ProtocolViolation as e:
            self._closed = ConnectionLost(None, str(e))
            await self._ws.close()
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(self._closed)


def _decode(raw: str | bytes) -> dict[str, Any]:
    try:
        msg = json.loads(raw)
    except ValueError as e:
        raise ProtocolViolation(f"node sent a message that is not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolViolation(f"node sent a message that is not an object: {msg!r}")
    return msg


def _lost(e: ConnectionClosed) -> ConnectionLost:
    frame = e.rcvd
    return ConnectionLost(frame.code if frame else None, frame.reason if frame else "")


def _lost_from(ws: ClientConnection) -> ConnectionLost:
    return ConnectionLost(ws.close_code, ws.close_reason or "")
