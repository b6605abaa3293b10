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
        ]
        if self.args.auth_url:
            out += [
                ("auth: no token is refused (1008)", self.auth_missing),
                ("auth: wrong token in header is refused", self.auth_wrong_header),
                ("auth: token in Authorization header", self.auth_header),
                ("auth: token in query parameter", self.auth_query),
                ("auth: token in first auth message", self.auth_message),
                ("auth: wrong token in auth message is refused", self.auth_wrong_message),
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
