//! Requests through the Rust client: the protocol's reference examples,
//! sinks, intermediate results, kwargs, datasets, handler styles, typed
//! decoding, diamonds, string results, and node shutdown.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{builder, client, counting, guard, start_default, start_node};
use mpreg::{Args, Client, Command, Error, ErrorCode, Function, Request, RpcError};
use serde_json::{Value, json};

fn echo(name: &str, arg: impl Into<Value>) -> Command {
    Command::new(name, "echo").arg(arg)
}

async fn send(client: &Client, request: Request) -> Value {
    let results = guard("request", client.send(request))
        .await
        .expect("request succeeds");
    Value::Object(results.into_map())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_reference_examples() {
    let node = start_default().await;
    let client = client(&node).await;
    let first = || echo("|first", "hi there!");
    let second = || echo("|second", "|first");
    let third_all = || {
        Command::new("|third", "echos")
            .arg("|first")
            .arg("|second")
            .arg("AND ME TOO")
    };
    let cases: Vec<(Request, Value)> = vec![
        (
            Request::new().cmd(echo("first", "hi there!")),
            json!({"first": "hi there!"}),
        ),
        (
            Request::new()
                .cmd(echo("first", "hi there!"))
                .cmd(echo("second", "first")),
            json!({"second": "hi there!"}),
        ),
        (
            Request::new().cmd(first()).cmd(second()).cmd(
                Command::new("|third", "echos")
                    .arg("|first")
                    .arg("AND ME TOO"),
            ),
            json!({"|second": "hi there!", "|third": ["hi there!", "AND ME TOO"]}),
        ),
        (
            Request::new().cmd(first()).cmd(second()).cmd(third_all()),
            json!({"|third": ["hi there!", "hi there!", "AND ME TOO"]}),
        ),
        (
            Request::new()
                .cmd(first())
                .cmd(second())
                .cmd(third_all())
                .cmd(echo("|4th", "|third")),
            json!({"|4th": ["hi there!", "hi there!", "AND ME TOO"]}),
        ),
    ];
    for (i, (request, expected)) in cases.into_iter().enumerate() {
        assert_eq!(send(&client, request).await, expected, "example #{}", i + 1);
    }
}

#[tokio::test]
async fn independent_command_is_returned_as_a_sink() {
    let node = start_default().await;
    let client = client(&node).await;
    let got = send(
        &client,
        Request::new()
            .cmd(echo("a", 1))
            .cmd(echo("b", 2))
            .cmd(echo("c", "a")),
    )
    .await;
    assert_eq!(got, json!({"b": 2, "c": 1}));
}

#[tokio::test]
async fn return_intermediate_results_returns_every_command() {
    let node = start_default().await;
    let client = client(&node).await;
    let request = || {
        Request::new()
            .cmd(echo("a", "x"))
            .cmd(echo("b", "a"))
            .cmd(Command::new("c", "echos").arg("b").arg("a"))
    };
    let only_sinks = send(&client, request()).await;
    assert_eq!(only_sinks, json!({"c": ["x", "x"]}));
    let all = send(&client, request().return_intermediate_results(true)).await;
    assert_eq!(all, json!({"a": "x", "b": "x", "c": ["x", "x"]}));

    // Without intermediate results, asking for a non-sink is an error.
    let results = guard("request", client.send(request()))
        .await
        .expect("request succeeds");
    assert_eq!(results.len(), 1);
    assert!(matches!(
        results.get::<String>("a"),
        Err(Error::NoSuchResult { name }) if name == "a"
    ));
}

#[tokio::test]
async fn kwargs_reach_runtime_functions_and_builtin_echo() {
    let named = Function::new("named", |args: Args| async move {
        Ok::<_, RpcError>(json!({
            "named": Value::Object(args.named().clone()),
            "positional": args.positional().len(),
        }))
    });
    let node = start_node(builder().function(named)).await;
    let client = client(&node).await;

    let got: Value = guard(
        "kwargs call",
        client.call_command(
            Command::new("k", "named")
                .arg(0)
                .kwarg("x", 1)
                .kwarg("y", "two"),
        ),
    )
    .await
    .expect("kwargs call");
    assert_eq!(got, json!({"named": {"x": 1, "y": "two"}, "positional": 1}));

    let echoed: String = guard(
        "echo kwarg",
        client.call_command(Command::new("e", "echo").kwarg("arg", "by name")),
    )
    .await
    .expect("echo with kwarg");
    assert_eq!(echoed, "by name");

    // A kwarg value naming another command is a reference too.
    let got = send(
        &client,
        Request::new()
            .cmd(echo("src", json!([1, 2])))
            .cmd(Command::new("dst", "echo").kwarg("arg", "src")),
    )
    .await;
    assert_eq!(got, json!({"dst": [1, 2]}));
}

#[tokio::test]
async fn node_datasets_route_whoami() {
    let node = start_node(builder().name("ds-node").datasets(["model-a", "model-b"])).await;
    let client = client(&node).await;
    for locs in [vec!["model-a"], vec!["model-a", "model-b"], vec![]] {
        let who: String = guard(
            "whoami",
            client.call_command(Command::new("w", "mpreg.whoami").datasets(locs.clone())),
        )
        .await
        .unwrap_or_else(|e| panic!("whoami with {locs:?}: {e}"));
        assert_eq!(who, "ds-node");
    }
    let err = guard(
        "whoami model-c",
        client.call_command::<String>(Command::new("w", "mpreg.whoami").dataset("model-c")),
    )
    .await
    .expect_err("no node has model-c");
    let Error::Rpc(e) = err else {
        panic!("expected an RPC error, got {err:?}")
    };
    assert_eq!(e.code, ErrorCode::NoNodeForDatasets);
    assert_eq!(e.command.as_deref(), Some("w"));
    assert!(e.message.contains("model-c"), "{}", e.message);
}

#[tokio::test]
async fn function_datasets_add_to_node_datasets() {
    let special = Function::new("special.fn", |_args: Args| async move {
        Ok::<_, RpcError>(json!("special ran"))
    })
    .datasets(["special"]);
    let node = start_node(builder().datasets(["model-a"]).function(special)).await;
    let client = client(&node).await;
    let run = |locs: Vec<&'static str>| {
        let client = client.clone();
        async move {
            guard(
                "special.fn",
                client.call_command::<String>(Command::new("s", "special.fn").datasets(locs)),
            )
            .await
        }
    };
    for locs in [
        vec![],
        vec!["special"],
        vec!["model-a"],
        vec!["special", "model-a"],
    ] {
        assert_eq!(
            run(locs.clone())
                .await
                .unwrap_or_else(|e| panic!("{locs:?}: {e}")),
            "special ran"
        );
    }
    for locs in [vec!["other"], vec!["special", "other"]] {
        match run(locs.clone()).await {
            Err(Error::Rpc(e)) => assert_eq!(e.code, ErrorCode::NoNodeForDatasets, "{locs:?}"),
            other => panic!("{locs:?}: expected no_node_for_datasets, got {other:?}"),
        }
    }
    // The function's own datasets are not the node's: a built-in does not
    // have `special`.
    match guard(
        "echo special",
        client.call_command::<Value>(Command::new("e", "echo").arg(1).dataset("special")),
    )
    .await
    {
        Err(Error::Rpc(e)) => assert_eq!(e.code, ErrorCode::NoNodeForDatasets),
        other => panic!("expected no_node_for_datasets, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_and_sync_style_handlers() {
    let slow = Function::new("slow.add", |args: Args| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let sum: i64 = args.positional().iter().filter_map(Value::as_i64).sum();
        Ok::<_, RpcError>(json!(sum))
    });
    // Sync-style: the work happens outside the future, which is ready at once.
    let upper = Function::new("upper", |args: Args| {
        let out = args
            .positional()
            .first()
            .and_then(Value::as_str)
            .map(str::to_uppercase)
            .ok_or_else(|| RpcError::bad_arguments("upper takes a string"));
        std::future::ready(out.map(Value::String))
    });
    let node = start_node(builder().function(slow).function(upper)).await;
    let client = client(&node).await;
    let sum: i64 = guard("slow.add", client.call("slow.add", (1, 2, 39)))
        .await
        .expect("slow.add");
    assert_eq!(sum, 42);
    let up: String = guard("upper", client.call("upper", ("shout",)))
        .await
        .expect("upper");
    assert_eq!(up, "SHOUT");
    // Both in one request, chained.
    let got = send(
        &client,
        Request::new()
            .cmd(Command::new("n", "slow.add").arg(20).arg(22))
            .cmd(echo("s", "n"))
            .cmd(Command::new("u", "upper").arg("done")),
    )
    .await;
    assert_eq!(got, json!({"s": 42, "u": "DONE"}));
}

#[tokio::test]
async fn typed_decode_and_decode_failure() {
    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Point {
        x: i32,
        y: i32,
    }
    let node = start_default().await;
    let client = client(&node).await;
    let p: Point = guard(
        "echo point",
        client.call("echo", (json!({"x": 1, "y": -2}),)),
    )
    .await
    .expect("decodes a struct");
    assert_eq!(p, Point { x: 1, y: -2 });
    let v: Vec<String> = guard("echos", client.call("echos", ("a", "b")))
        .await
        .expect("decodes a list");
    assert_eq!(v, ["a", "b"]);
    let unit: Vec<Value> = guard("echos none", client.call("echos", ()))
        .await
        .expect("no arguments");
    assert!(unit.is_empty());

    let err = guard("bad decode", client.call::<i64>("echo", ("not a number",)))
        .await
        .expect_err("a string is not an i64");
    assert!(
        matches!(err, Error::Json(_)),
        "expected Error::Json, got {err:?}"
    );
    // The connection is still fine afterwards.
    let n: i64 = guard("echo", client.call("echo", (5,)))
        .await
        .expect("echo");
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diamond_runs_shared_input_once() {
    let (top, calls) = counting("top");
    let node = start_node(builder().function(top)).await;
    let client = client(&node).await;
    let got = send(
        &client,
        Request::new()
            .cmd(Command::new("top", "top").arg(7))
            .cmd(echo("left", "top"))
            .cmd(echo("right", "top"))
            .cmd(
                Command::new("join", "echos")
                    .arg("left")
                    .arg("right")
                    .arg("top"),
            ),
    )
    .await;
    assert_eq!(got, json!({"join": [[7], [7], [7]]}));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "shared input ran once");
}

#[tokio::test]
async fn string_result_equal_to_a_command_name_stays_a_value() {
    let named = Function::new("gives.name", |_args: Args| async move {
        Ok::<_, RpcError>(json!("X"))
    });
    let node = start_node(builder().function(named)).await;
    let client = client(&node).await;
    let got = send(
        &client,
        Request::new()
            .cmd(Command::new("a", "gives.name"))
            .cmd(echo("X", "X-result"))
            .cmd(Command::new("c", "echos").arg("a")),
    )
    .await;
    assert_eq!(got, json!({"X": "X-result", "c": ["X"]}));

    // A command's own name as its argument is a plain value, too.
    let own: String = guard("own name", client.call_command(echo("self", "self")))
        .await
        .expect("own name");
    assert_eq!(own, "self");
    // Nested strings are not references.
    let got = send(
        &client,
        Request::new()
            .cmd(echo("a", 1))
            .cmd(echo("b", json!(["a", {"k": "a"}]))),
    )
    .await;
    assert_eq!(got, json!({"a": 1, "b": ["a", {"k": "a"}]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_connections_and_closes_clients() {
    let node = start_default().await;
    let url = node.url().expect("node listens");
    let client = client(&node).await;
    let before: String = guard("echo", client.call("echo", ("up",)))
        .await
        .expect("echo before shutdown");
    assert_eq!(before, "up");

    guard("shutdown", node.shutdown()).await;

    let connect = guard("connect after shutdown", Client::connect(&url)).await;
    assert!(
        matches!(connect, Err(Error::Connect { .. })),
        "connecting after shutdown must fail, got {connect:?}"
    );
    let call = guard(
        "call after shutdown",
        client.call::<String>("echo", ("down",)),
    )
    .await;
    assert!(
        matches!(call, Err(Error::Closed | Error::Transport(_))),
        "a call after shutdown must fail with Closed, got {call:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_request_in_flight_finish() {
    let started = Arc::new(AtomicUsize::new(0));
    let seen = started.clone();
    let slow = Function::new("slow", move |_args: Args| {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, RpcError>(json!("finished"))
        }
    });
    let node = start_node(builder().function(slow)).await;
    let client = client(&node).await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call::<String>("slow", ()).await }
    });
    common::wait_until("slow started", || started.load(Ordering::SeqCst) == 1).await;
    guard("shutdown", node.shutdown()).await;
    let got = guard("in-flight call", call)
        .await
        .expect("join")
        .expect("the request in flight is answered");
    assert_eq!(got, "finished");
}

#[tokio::test]
async fn default_node_name_is_mpreg_port_and_whoami_reports_it() {
    let node = start_default().await;
    let port = node.local_addr().expect("node listens").port();
    assert_ne!(port, 0);
    assert_eq!(node.name(), format!("mpreg-{port}"));
    assert_eq!(
        node.url().expect("node listens"),
        format!("ws://127.0.0.1:{port}")
    );
    let client = client(&node).await;
    let who: String = guard("whoami", client.call("mpreg.whoami", ()))
        .await
        .expect("whoami");
    assert_eq!(who, node.name());
}

#[tokio::test]
async fn huge_request_timeout_on_the_wire_is_accepted() {
    let node = start_default().await;
    let mut ws = common::RawWs::connect(&node.url().expect("node listens")).await;
    let reply = ws
        .request(&json!({"role": "rpc", "u": "max", "timeout_ms": u64::MAX,
            "cmds": [common::cmd("e", "echo", json!([1]))]}))
        .await;
    assert_eq!(common::ok_r(&reply, &json!("max")), json!({"e": 1}));
}

#[tokio::test]
async fn huge_client_timeout_does_not_panic() {
    let node = start_default().await;
    let client = client(&node).await;
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .send(Request::new().cmd(echo("e", 1)).timeout(Duration::MAX))
                .await
        }
    });
    let results = guard("call", call)
        .await
        .expect("Client::send must not panic")
        .expect("request succeeds");
    assert_eq!(results.get::<i64>("e").expect("e"), 1);
}
