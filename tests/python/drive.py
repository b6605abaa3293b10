"""Drives an mpreg node with the Python client and checks every reply.

    python drive.py ws://127.0.0.1:7773 [--dataset D]
        [--auth-url ws://127.0.0.1:7774 --token TOKEN]

The node must serve the built-ins (`echo`, `echos`, `mpreg.whoami`,
`mpreg.functions`) and two test functions:

- `greet(name: String, greeting: Option<String>) -> String`, returning
  `"{greeting}, {name}!"` (`greeting` defaults to `hello`), and failing with
  `bad_arguments` on an unknown or mistyped argument;
- `delay_echo(value, ms: u64)`, returning `value` after `ms` milliseconds.

`--dataset` names a dataset the node has; `--auth-url` is a second node that
requires `--token`. Prints one line per check; exits 1 if any check failed.

Requests carry mpreg's marker (`"mpreg": 1`) except in the "later client"
checks, which send flat requests as the original project's later client does
and check each reply against that client's reply model (`check_later_reply`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import traceback
from typing import Any, Awaitable, Callable

from mpreg_client import Client, Command, ConnectionLost, MpregError

# Hang guard of one check (never a performance assertion).
CHECK_TIMEOUT = 30.0

Check = Callable[[], Awaitable[None]]


class Mismatch(Exception):
    """A reply differs from what docs/PROTOCOL.md says it must be."""


def expect(what: str, got: Any, want: Any) -> None:
    if got != want:
        raise Mismatch(f"{what}: expected {want!r}, got {got!r}")


def expect_true(what: str, cond: bool, detail: Any = None) -> None:
    if not cond:
        raise Mismatch(f"{what}" + (f" ({detail!r})" if detail is not None else ""))


async def expect_error(
    what: str, fut: Awaitable[Any], code: str, command: str | None = None
) -> MpregError:
    try:
        got = await fut
    except MpregError as e:
        expect(f"{what}: error code", e.code, code)
        if command is not None:
            expect(f"{what}: error command", e.command, command)
        expect_true(f"{what}: error message is empty", bool(e.message))
        return e
    raise Mismatch(f"{what}: expected a {code} error, got the result {got!r}")


# docs/PROTOCOL.md, "The later client's form": the original project's
# number for each of mpreg's codes.
LATER_CODES = {
    "bad_request": 1004,
    "duplicate_name": 1004,
    "cycle": 1003,
    "unknown_function": 1001,
    "no_node_for_datasets": 1001,
    "bad_arguments": 1003,
    "handler_failed": 1003,
    "timeout": 1004,
    "node_lost": 1003,
    "overloaded": 429,
    "too_large": 1003,
    "unauthorized": 403,
    "internal": 1002,
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fields(what: str, obj: Any, fields: dict[str, Callable[[Any], bool]]) -> None:
    expect_true(f"{what} is an object", isinstance(obj, dict), obj)
    for name, ok in fields.items():
        expect_true(f"{what} has `{name}`", name in obj, obj)
        expect_true(f"{what}.{name} has the documented type", ok(obj[name]), obj[name])


def check_later_reply(reply: Any) -> None:
    """The reply model of the original project's later client, as
    docs/PROTOCOL.md describes it: every field present, with its type."""
    is_str = lambda v: isinstance(v, str)  # noqa: E731
    is_dict = lambda v: isinstance(v, dict)  # noqa: E731
    _fields(
        "reply",
        reply,
        {
            "u": is_str,
            "r": lambda v: v is None or is_dict(v),
            "error": lambda v: v is None or is_dict(v),
            "intermediate_results": lambda v: isinstance(v, list),
            "execution_summary": lambda v: v is None or is_dict(v),
        },
    )
    expect_true("`r` or `error`", (reply["r"] is None) != (reply["error"] is None), reply)
    if reply["error"] is not None:
        _fields(
            "error",
            reply["error"],
            {"code": _is_int, "message": is_str, "kind": is_str, "details": lambda v: True},
        )
        expect(
            "error.code is the number of error.kind",
            reply["error"]["code"],
            LATER_CODES.get(reply["error"]["kind"]),
        )
    for entry in reply["intermediate_results"]:
        _fields(
            "intermediate result",
            entry,
            {
                "request_id": is_str,
                "level_index": _is_int,
                "level_results": is_dict,
                "accumulated_results": is_dict,
                "total_levels": _is_int,
                "completed_levels": _is_int,
                "timestamp": _is_number,
                "execution_time_ms": _is_number,
            },
        )
    if reply["execution_summary"] is not None:
        _fields(
            "execution summary",
            reply["execution_summary"],
            {
                "request_id": is_str,
                "total_execution_time_ms": _is_number,
                "total_levels": _is_int,
                "level_execution_times": lambda v: isinstance(v, list) and all(map(_is_number, v)),
                "bottleneck_level_index": _is_int,
                "average_level_time_ms": _is_number,
                "parallel_commands_executed": _is_int,
                "cross_cluster_hops": _is_int,
            },
        )


# The five reference examples of docs/PROTOCOL.md: commands and reply `r`.
HI = "hi there!"
REFERENCE_EXAMPLES: list[tuple[list[Command], dict[str, Any]]] = [
    ([Command("first", "echo", [HI])], {"first": HI}),
    (
        [Command("first", "echo", [HI]), Command("second", "echo", ["first"])],
        {"second": HI},
    ),
    (
        [
            Command("|first", "echo", [HI]),
            Command("|second", "echo", ["|first"]),
            Command("|third", "echos", ["|first", "AND ME TOO"]),
        ],
        {"|second": HI, "|third": [HI, "AND ME TOO"]},
    ),
    (
        [
            Command("|first", "echo", [HI]),
            Command("|second", "echo", ["|first"]),
            Command("|third", "echos", ["|first", "|second", "AND ME TOO"]),
        ],
        {"|third": [HI, HI, "AND ME TOO"]},
    ),
    (
        [
            Command("|first", "echo", [HI]),
            Command("|second", "echo", ["|first"]),
            Command("|third", "echos", ["|first", "|second", "AND ME TOO"]),
            Command("|4th", "echo", ["|third"]),
        ],
        {"|4th": [HI, HI, "AND ME TOO"]},
    ),
]


class Scenario:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.client: Client | None = None
        self.node_name: str | None = None

    @property
    def c(self) -> Client:
        assert self.client is not None, "connected in run()"
        return self.client

    def checks(self) -> list[tuple[str, Check]]:
        out: list[tuple[str, Check]] = []
        for i, (cmds, want) in enumerate(REFERENCE_EXAMPLES, 1):
            out.append((f"reference example {i} (flat envelope)", self._example(cmds, want, False)))
        for i, (cmds, want) in enumerate(REFERENCE_EXAMPLES, 1):
            out.append((f"reference example {i} (nested rpc envelope)", self._example(cmds, want, True)))
        out += [
            ("request in a binary frame", self.binary_frame),
            ("numeric request id is echoed", self.numeric_id),
            ("return_intermediate_results", self.intermediate),
            ("nested envelope with timeout_ms and intermediate results", self.nested_options),
            ("reference rules: nested, own name, results", self.reference_rules),
            ("kwargs call", self.kwargs_call),
            ("kwargs value referencing a command", self.kwargs_reference),
            ("positional and kwargs together", self.mixed_args),
            ("locs: a dataset the node has", self.locs_match),
            ("error unknown_function", self.unknown_function),
            ("error cycle with details", self.cycle),
            ("error duplicate_name", self.duplicate_name),
            ("error bad_arguments (unknown kwarg)", self.bad_kwarg),
            ("error bad_arguments (wrong type)", self.bad_type),
            ("error bad_arguments (too many for echo)", self.echo_too_many),
            ("error no_node_for_datasets", self.no_node_for_datasets),
            ("error bad_request (no commands)", self.no_commands),
            ("error timeout (timeout_ms)", self.timeout),
            ("malformed JSON gets a reply with its u when readable, else null", self.malformed_json),
            ("a JSON array gets a reply with u null", self.not_an_object),
            ("an auth message a node does not need gets bad_request", self.needless_auth),
            ("50 concurrent requests matched by u", self.concurrent),
            ("mpreg.functions lists the functions", self.functions),
            ("later client: successes carry its fields", self.later_success),
            ("later client: every error has an integer code", self.later_errors),
            ("later client: malformed request with an id", self.later_malformed),
            ("later client: intermediate results level by level", self.later_levels),
            ("later client: levels with an independent command", self.later_levels_independent),
            ("later client: execution summary", self.later_summary),
            ("mpreg's marker keeps every result, no levels", self.marked_intermediate),
        ]
        if self.args.auth_url:
            out += [
                ("auth: no token is refused (1008)", self.auth_missing),
                ("auth: wrong token in header is refused", self.auth_wrong_header),
                ("auth: token in Authorization header", self.auth_header),
                ("auth: token in query parameter", self.auth_query),
                ("auth: token in first auth message", self.auth_message),
                ("auth: wrong token in auth message is refused", self.auth_wrong_message),
                ("later client: no token is refused with 403", self.later_auth_missing),
            ]
        return out

    # Reference examples and envelopes.

    def _example(self, cmds: list[Command], want: dict[str, Any], nested: bool) -> Check:
        async def check() -> None:
            u = self.c.next_id()
            msg = Client.build(cmds, u, nested=nested)
            reply = await self.c.send(msg)
            expect("role", reply.get("role"), "rpc-response")
            expect("u", reply.get("u"), u)
            expect("error", reply.get("error"), None)
            expect("r", reply.get("r"), want)

        return check

    async def binary_frame(self) -> None:
        cmds, want = REFERENCE_EXAMPLES[2]
        reply = await self.c.send(Client.build(cmds, "binary-1"), binary=True)
        expect("r", Client.result(reply), want)

    async def numeric_id(self) -> None:
        reply = await self.c.send(Client.build([Command("x", "echo", [1])], 424242))
        expect("u", reply.get("u"), 424242)
        expect_true("u is a JSON number", isinstance(reply.get("u"), int), reply.get("u"))
        expect("r", Client.result(reply), {"x": 1})

    async def intermediate(self) -> None:
        cmds, _ = REFERENCE_EXAMPLES[2]
        r = await self.c.request(cmds, return_intermediate_results=True)
        expect("r", r, {"|first": HI, "|second": HI, "|third": [HI, "AND ME TOO"]})

    async def nested_options(self) -> None:
        cmds, _ = REFERENCE_EXAMPLES[1]
        r = await self.c.request(cmds, nested=True, return_intermediate_results=True, timeout_ms=60_000)
        expect("r", r, {"first": HI, "second": HI})
        await expect_error(
            "nested delay_echo(10 s) with timeout_ms 100",
            self.c.request([Command("slow", "delay_echo", ["late", 10_000])], nested=True, timeout_ms=100),
            "timeout",
        )

    async def reference_rules(self) -> None:
        r = await self.c.request(
            [
                # Nested values are not searched; its own name is a value.
                Command("a", "echo", ["x"]),
                Command("b", "echos", [["a"], {"k": "a"}, "b"]),
                # `g`'s result is the name of another command: `d` gets the
                # string, not that command's result.
                Command("g", "greet", [], {"name": "ada", "greeting": "hi"}),
                Command("d", "echo", ["g"]),
                Command("hi, ada!", "echo", [5]),
            ]
        )
        # `g` is referenced by `d`; every other command is a sink.
        expect("r", r, {"a": "x", "b": [["a"], {"k": "a"}, "b"], "d": "hi, ada!", "hi, ada!": 5})

    # kwargs and datasets.

    async def kwargs_call(self) -> None:
        got = await self.c.call("greet", name="ada", greeting="hi")
        expect("greet(name=ada, greeting=hi)", got, "hi, ada!")
        got = await self.c.call("greet", name="ada")
        expect("greet(name=ada)", got, "hello, ada!")

    async def kwargs_reference(self) -> None:
        r = await self.c.request(
            [
                Command("who", "echo", ["grace"]),
                Command("g", "greet", [], {"name": "who", "greeting": "welcome"}),
            ]
        )
        expect("r", r, {"g": "welcome, grace!"})

    async def mixed_args(self) -> None:
        got = await self.c.call("greet", "bob", greeting="hey")
        expect("greet('bob', greeting=hey)", got, "hey, bob!")

    async def locs_match(self) -> None:
        if not self.args.dataset:
            raise Mismatch("run with --dataset naming a dataset the node has")
        name = await self.c.call("mpreg.whoami")
        expect_true("mpreg.whoami returns a string", isinstance(name, str), name)
        self.node_name = name
        got = await self.c.call("mpreg.whoami", locs=[self.args.dataset])
        expect(f"mpreg.whoami on {self.args.dataset}", got, name)

    # Error replies.

    async def unknown_function(self) -> None:
        e = await expect_error(
            "no_such_fun",
            self.c.request([Command("first", "echo", [1]), Command("x", "no_such_fun", ["first"])]),
            "unknown_function",
            "x",
        )
        expect_true("message names the function", "no_such_fun" in e.message, e.message)

    async def cycle(self) -> None:
        # `a` references `b`, `b` references `c`, `c` references `a`.
        refs = {"a": "b", "b": "c", "c": "a"}
        e = await expect_error(
            "a → b → c → a",
            self.c.request([Command(n, "echo", [r]) for n, r in refs.items()] + [Command("free", "echo", [1])]),
            "cycle",
        )
        expect_true("details is an object", isinstance(e.details, dict), e.details)
        cycle = e.details.get("cycle")
        expect_true("details.cycle is a list", isinstance(cycle, list), e.details)
        expect("commands in details.cycle", sorted(cycle), ["a", "b", "c"])
        # Each is an input of the next, the last an input of the first.
        for i, name in enumerate(cycle):
            after = cycle[(i + 1) % len(cycle)]
            expect_true(f"{name} is an input of {after}", refs[after] == name, cycle)
        for name in cycle:
            expect_true(f"message names {name}", name in e.message, e.message)

    async def duplicate_name(self) -> None:
        await expect_error(
            "two commands named a",
            self.c.request([Command("a", "echo", [1]), Command("a", "echo", [2])]),
            "duplicate_name",
            "a",
        )

    async def bad_kwarg(self) -> None:
        e = await expect_error(
            "greet(nmae=...)",
            self.c.request([Command("g", "greet", [], {"nmae": "ada"})]),
            "bad_arguments",
            "g",
        )
        expect_true("message names the argument", "nmae" in e.message, e.message)

    async def bad_type(self) -> None:
        e = await expect_error(
            "greet(name=7)",
            self.c.request([Command("g", "greet", [], {"name": 7})]),
            "bad_arguments",
            "g",
        )
        expect_true("message names the parameter", "name" in e.message, e.message)

    async def echo_too_many(self) -> None:
        await expect_error(
            "echo(1, 2)",
            self.c.request([Command("e", "echo", [1, 2])]),
            "bad_arguments",
            "e",
        )

    async def no_node_for_datasets(self) -> None:
        await expect_error(
            "whoami on a missing dataset",
            self.c.request([Command("w", "mpreg.whoami", [], {}, ["no-such-dataset"])]),
            "no_node_for_datasets",
            "w",
        )

    async def no_commands(self) -> None:
        reply = await self.c.send({"role": "rpc", "mpreg": 1, "u": "empty", "cmds": []})
        expect("u", reply.get("u"), "empty")
        expect("r", reply.get("r"), None)
        expect("error.code", (reply.get("error") or {}).get("code"), "bad_request")

    async def timeout(self) -> None:
        await expect_error(
            "delay_echo(10 s) with timeout_ms 200",
            self.c.request([Command("slow", "delay_echo", ["late", 10_000])], timeout_ms=200),
            "timeout",
        )

    async def malformed_json(self) -> None:
        # No readable id: the reply's `u` is null.
        reply = await self.c.send_raw('{"role": "rpc", "cmds": [', timeout=CHECK_TIMEOUT)
        self._expect_unmatched_bad_request(reply)
        # The id is readable before the message breaks off: the reply carries it
        # (in mpreg's form: the marker comes before the break).
        reply = await self.c.send_raw(
            '{"role": "rpc", "mpreg": 1, "u": "broken", "cmds": [', timeout=CHECK_TIMEOUT
        )
        self._expect_unmatched_bad_request(reply, u="broken")
        # The connection stays usable.
        got = await self.c.call("echo", "still here")
        expect("echo after the malformed message", got, "still here")

    async def not_an_object(self) -> None:
        reply = await self.c.send_raw(b'["not", "an", "object"]', timeout=CHECK_TIMEOUT)
        self._expect_unmatched_bad_request(reply)
        got = await self.c.call("echo", "still here")
        expect("echo after the array", got, "still here")

    async def needless_auth(self) -> None:
        reply = await self.c.send_raw('{"role": "auth", "token": "t"}', timeout=CHECK_TIMEOUT)
        self._expect_unmatched_bad_request(reply)
        got = await self.c.call("echo", "still here")
        expect("echo after the auth message", got, "still here")

    @staticmethod
    def _expect_unmatched_bad_request(reply: dict[str, Any], u: Any = None) -> None:
        expect("role", reply.get("role"), "rpc-response")
        expect_true("reply has u", "u" in reply, reply)
        expect("u", reply["u"], u)
        expect("r", reply.get("r"), None)
        expect("error.code", (reply.get("error") or {}).get("code"), "bad_request")
        expect("error.kind", (reply.get("error") or {}).get("kind"), "bad_request")

    # Many requests in flight.

    async def concurrent(self) -> None:
        n = 50
        arrived: list[int] = []

        async def one(i: int) -> None:
            # Later requests finish sooner: replies come back out of order.
            u = f"many-{i}"
            msg = Client.build([Command("v", "delay_echo", [{"i": i}, (n - i) * 4])], u)
            reply = await self.c.send(msg)
            expect(f"request {i}: u", reply.get("u"), u)
            expect(f"request {i}: r", Client.result(reply), {"v": {"i": i}})
            arrived.append(i)

        await asyncio.gather(*(one(i) for i in range(n)))
        expect("replies", sorted(arrived), list(range(n)))
        reordered = arrived != sorted(arrived)
        print(f"      ({n} replies; completion order differed from sending order: {reordered})")

    async def functions(self) -> None:
        listing = await self.c.call("mpreg.functions")
        expect_true("a list", isinstance(listing, list), type(listing).__name__)
        by_name = {f.get("name"): f for f in listing if isinstance(f, dict)}
        for name in ["echo", "echos", "mpreg.whoami", "mpreg.functions", "greet", "delay_echo"]:
            expect_true(f"{name} is listed", name in by_name, sorted(by_name))
        for name, f in by_name.items():
            for key in ["params", "returns", "doc", "idempotent", "nodes"]:
                expect_true(f"{name} has {key}", key in f, f)
            expect_true(f"{name}: nodes is a non-empty list", isinstance(f["nodes"], list) and f["nodes"], f)
            for node in f["nodes"]:
                expect_true(f"{name}: node entry has node and datasets", {"node", "datasets"} <= set(node), node)
        greet = by_name["greet"]
        expect("greet parameter names", [p.get("name") for p in greet["params"]], ["name", "greeting"])
        expect_true("greet has a doc", bool(greet["doc"]), greet)
        if self.node_name is not None:
            nodes = [n["node"] for n in greet["nodes"]]
            expect("greet runs on", nodes, [self.node_name])
            if self.args.dataset:
                expect_true(
                    "the node's dataset is listed for greet",
                    self.args.dataset in greet["nodes"][0]["datasets"],
                    greet["nodes"],
                )

    # The original project's later client: flat requests without the marker.
    # Its reply model (docs/PROTOCOL.md, "The later client's form") must
    # accept every reply, or that client never resolves its call.

    async def _later(self, cmds: list[Command], **options: Any) -> dict[str, Any]:
        u = self.c.next_id()
        reply = await self.c.send(Client.build(cmds, u, marker=False, **options))
        check_later_reply(reply)
        expect("u", reply["u"], u)
        return reply

    async def later_success(self) -> None:
        cmds, want = REFERENCE_EXAMPLES[2]
        reply = await self._later(cmds)
        expect("r", reply["r"], want)
        expect("error", reply["error"], None)
        expect("intermediate_results", reply["intermediate_results"], [])
        expect("execution_summary", reply["execution_summary"], None)

    async def later_errors(self) -> None:
        cases: list[tuple[str, list[Command], dict[str, Any], str]] = [
            ("unknown function", [Command("x", "no_such_fun", [1])], {}, "unknown_function"),
            (
                "no node for datasets",
                [Command("w", "mpreg.whoami", [], {}, ["no-such-dataset"])],
                {},
                "no_node_for_datasets",
            ),
            ("duplicate name", [Command("a", "echo", [1]), Command("a", "echo", [2])], {}, "duplicate_name"),
            ("cycle", [Command("a", "echo", ["b"]), Command("b", "echo", ["a"])], {}, "cycle"),
            ("unknown kwarg", [Command("g", "greet", [], {"nmae": "ada"})], {}, "bad_arguments"),
            ("no commands", [], {}, "bad_request"),
            ("timeout", [Command("slow", "delay_echo", ["late", 10_000])], {"timeout_ms": 100}, "timeout"),
        ]
        for what, cmds, options, kind in cases:
            reply = await self._later(cmds, **options)
            error = reply["error"]
            expect_true(f"{what}: an error", error is not None, reply)
            expect(f"{what}: error.kind", error["kind"], kind)
            expect(f"{what}: error.code", error["code"], LATER_CODES[kind])
            expect_true(f"{what}: a message", bool(error["message"]), error)
            expect(f"{what}: r", reply["r"], None)
        # The marker's presence is the only difference: the same failure in
        # mpreg's form.
        e = await expect_error(
            "unknown function, marked",
            self.c.request([Command("x", "no_such_fun", [1])]),
            "unknown_function",
            "x",
        )
        expect("number in mpreg's form", e.number, None)

    async def later_malformed(self) -> None:
        # Not JSON past the id: the reply carries the id, in the later form.
        reply = await self.c.send_raw('{"role": "rpc", "u": "later-broken", "cmds": [', timeout=CHECK_TIMEOUT)
        check_later_reply(reply)
        expect("u", reply["u"], "later-broken")
        expect("error.code", reply["error"]["code"], LATER_CODES["bad_request"])
        expect("error.kind", reply["error"]["kind"], "bad_request")
        # No readable id: no request to match; mpreg's form.
        reply = await self.c.send_raw('{"role": "rpc", "cmds": [', timeout=CHECK_TIMEOUT)
        self._expect_unmatched_bad_request(reply)

    async def later_levels(self) -> None:
        cmds, last = REFERENCE_EXAMPLES[4]
        reply = await self._later(cmds, return_intermediate_results=True)
        # `r` holds the last level only; one entry per level.
        expect("r", reply["r"], last)
        levels = reply["intermediate_results"]
        expect("levels", len(levels), 4)
        names = [["|first"], ["|second"], ["|third"], ["|4th"]]
        accumulated: dict[str, Any] = {}
        for k, entry in enumerate(levels):
            expect(f"level {k}: request_id", entry["request_id"], reply["u"])
            expect(f"level {k}: level_index", entry["level_index"], k)
            expect(f"level {k}: total_levels", entry["total_levels"], 4)
            expect(f"level {k}: completed_levels", entry["completed_levels"], k + 1)
            expect(f"level {k}: level_results names", sorted(entry["level_results"]), names[k])
            accumulated.update(entry["level_results"])
            expect(f"level {k}: accumulated_results", entry["accumulated_results"], accumulated)
        expect("last level is r", levels[-1]["level_results"], last)
        expect("no summary unless asked", reply["execution_summary"], None)

    async def later_levels_independent(self) -> None:
        # `b` is a sink on level 0: the later client's `r` is the last level
        # (`c`); `b` is in the first entry.
        cmds = [Command("a", "echo", [1]), Command("b", "echo", [2]), Command("c", "echo", ["a"])]
        reply = await self._later(cmds, return_intermediate_results=True)
        expect("r", reply["r"], {"c": 1})
        levels = reply["intermediate_results"]
        expect("level 0", levels[0]["level_results"], {"a": 1, "b": 2})
        expect("level 1", levels[1]["level_results"], {"c": 1})
        # Without intermediate results, every sink (mpreg's rule).
        reply = await self._later(cmds)
        expect("r without levels", reply["r"], {"b": 2, "c": 1})

    async def later_summary(self) -> None:
        cmds, want = REFERENCE_EXAMPLES[3]
        reply = await self._later(cmds, include_execution_summary=True)
        expect("r", reply["r"], want)
        expect("no levels unless asked", reply["intermediate_results"], [])
        summary = reply["execution_summary"]
        expect_true("a summary", summary is not None, reply)
        expect("request_id", summary["request_id"], reply["u"])
        expect("total_levels", summary["total_levels"], 3)
        expect("level times", len(summary["level_execution_times"]), 3)
        expect("commands", summary["parallel_commands_executed"], 3)
        expect_true(
            "bottleneck is a level",
            0 <= summary["bottleneck_level_index"] < 3,
            summary["bottleneck_level_index"],
        )
        reply = await self._later(cmds, include_execution_summary=True, return_intermediate_results=True)
        expect("levels", len(reply["intermediate_results"]), 3)
        expect("summary levels", reply["execution_summary"]["total_levels"], 3)

    async def marked_intermediate(self) -> None:
        cmds, _ = REFERENCE_EXAMPLES[2]
        msg = Client.build(cmds, "marked-1", return_intermediate_results=True, include_execution_summary=True)
        reply = await self.c.send(msg)
        expect("r", Client.result(reply), {"|first": HI, "|second": HI, "|third": [HI, "AND ME TOO"]})
        expect_true("no intermediate_results", "intermediate_results" not in reply, reply)
        expect_true("no execution_summary", "execution_summary" not in reply, reply)

    async def later_auth_missing(self) -> None:
        client = await Client.connect(self.args.auth_url)
        try:
            reply = await client.send(Client.build([Command("e", "echo", [1])], "later-auth", marker=False))
            check_later_reply(reply)
            expect("error.code", reply["error"]["code"], LATER_CODES["unauthorized"])
            expect("error.kind", reply["error"]["kind"], "unauthorized")
            closed = await client.wait_closed(CHECK_TIMEOUT)
            expect("close code", closed.code, 1008)
        finally:
            await client.close()

    # Authentication (a second node that requires a token).

    async def _refused(self, client: Client, what: str) -> None:
        e = await expect_error(what, client.call("echo", 1), "unauthorized")
        expect_true("reply carries the request's u", e.u is not None, e.u)
        closed = await client.wait_closed(CHECK_TIMEOUT)
        expect("close code", closed.code, 1008)

    async def auth_missing(self) -> None:
        client = await Client.connect(self.args.auth_url)
        try:
            await self._refused(client, "request without a token")
        finally:
            await client.close()

    async def auth_wrong_header(self) -> None:
        client = await Client.connect(self.args.auth_url, token="not-the-token")
        try:
            await self._refused(client, "request with a wrong token")
        finally:
            await client.close()

    async def _authorized(self, via: str) -> None:
        async with await Client.connect(self.args.auth_url, token=self.args.token, token_via=via) as client:
            expect("echo", await client.call("echo", via), via)
            cmds, want = REFERENCE_EXAMPLES[4]
            expect("example 5", await client.request(cmds), want)

    async def auth_header(self) -> None:
        await self._authorized("header")

    async def auth_query(self) -> None:
        await self._authorized("query")

    async def auth_message(self) -> None:
        await self._authorized("message")

    async def auth_wrong_message(self) -> None:
        try:
            client = await Client.connect(self.args.auth_url, token="not-the-token", token_via="message")
        except MpregError as e:
            expect("error code", e.code, "unauthorized")
            return
        except ConnectionLost as e:
            raise Mismatch(f"closed without an unauthorized reply: {e}") from None
        await client.close()
        raise Mismatch("a wrong token in the auth message was accepted")

    async def run(self) -> int:
        self.client = await asyncio.wait_for(Client.connect(self.args.url), CHECK_TIMEOUT)
        failed = 0
        checks = self.checks()
        try:
            for name, check in checks:
                start = time.monotonic()
                try:
                    await asyncio.wait_for(check(), CHECK_TIMEOUT)
                except Mismatch as e:
                    failed += 1
                    print(f"FAIL  {name}: {e}", flush=True)
                    continue
                except asyncio.TimeoutError:
                    failed += 1
                    print(f"FAIL  {name}: no answer within {CHECK_TIMEOUT:.0f} s", flush=True)
                    continue
                except Exception as e:  # an unexpected exception is a failed check
                    failed += 1
                    print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
                    traceback.print_exc()
                    continue
                print(f"ok    {name} ({(time.monotonic() - start) * 1000:.0f} ms)", flush=True)
        finally:
            await self.c.close()
        if failed:
            print(f"drive.py: {failed} of {len(checks)} checks FAILED", flush=True)
            return 1
        print(f"drive.py: all {len(checks)} checks ok", flush=True)
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the node, ws://HOST:PORT")
    parser.add_argument("--dataset", help="a dataset the node has")
    parser.add_argument("--auth-url", help="a node that requires --token")
    parser.add_argument("--token", help="a token --auth-url accepts")
    args = parser.parse_args()
    if args.auth_url and not args.token:
        parser.error("--auth-url needs --token")
    return asyncio.run(Scenario(args).run())


if __name__ == "__main__":
    sys.exit(main())
