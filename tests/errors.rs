//! Every error code a single node produces, with its code, the failing
//! command's name and the message checked; and that errors leave the node
//! (and the connection) serving.

mod common;

use std::fmt::Debug;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{
    RawWs, builder, client, cmd, counting, err_of, flat, guard, ok_r, start_default, start_node,
};
use mpreg::{Client, Command, Error, ErrorCode, Request, RpcError};
use serde_json::{Value, json};

/// Sends `request` and returns the node's error (panics on success or on any
/// other kind of failure).
async fn rpc_err(client: &Client, request: Request) -> RpcError {
    let outcome = guard("request", client.send(request)).await;
    into_rpc(outcome)
}

fn into_rpc<T: Debug>(outcome: Result<T, Error>) -> RpcError {
    match outcome {
        Err(Error::Rpc(e)) => e,
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

fn one(command: Command) -> Request {
    Request::new().cmd(command)
}

#[tokio::test]
async fn unknown_function_names_the_function_and_command() {
    let node = start_default().await;
    let client = client(&node).await;
    let e = rpc_err(&client, one(Command::new("x", "no_such_fun").arg(1))).await;
    assert_eq!(e.code, ErrorCode::UnknownFunction);
    assert_eq!(e.command.as_deref(), Some("x"));
    assert!(e.message.contains("'no_such_fun'"), "{}", e.message);
    // `debug.*` are not served without diagnostics.
    let plain = start_node(builder().diagnostics(false)).await;
    let plain_client = common::client(&plain).await;
    let e = rpc_err(&plain_client, one(Command::new("s", "debug.sleep").arg(1))).await;
    assert_eq!(e.code, ErrorCode::UnknownFunction);
    assert!(e.message.contains("debug.sleep"), "{}", e.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_function_in_a_multi_command_request_runs_nothing() {
    let (counted, calls) = counting("counted");
    let node = start_node(builder().function(counted)).await;
    let client = client(&node).await;
    let e = rpc_err(
        &client,
        Request::new()
            .cmd(Command::new("first", "counted").arg(1))
            .cmd(Command::new("independent", "counted").arg(2))
            .cmd(Command::new("after", "counted").arg("first"))
            .cmd(Command::new("bad", "no_such_fun").arg("first")),
    )
    .await;
    assert_eq!(e.code, ErrorCode::UnknownFunction);
    assert_eq!(e.command.as_deref(), Some("bad"));
    assert!(e.message.contains("no_such_fun"), "{}", e.message);
    assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing ran");

    // The same holds for a command that cannot run for lack of datasets.
    let e = rpc_err(
        &client,
        Request::new()
            .cmd(Command::new("first", "counted").arg(1))
            .cmd(Command::new("w", "mpreg.whoami").dataset("nowhere")),
    )
    .await;
    assert_eq!(e.code, ErrorCode::NoNodeForDatasets);
    assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing ran");

    // Sanity: the counter does count.
    let _: Value = guard("counted", client.call("counted", (1,)))
        .await
        .expect("counted runs");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn no_node_for_datasets() {
    let node = start_node(builder().datasets(["model-a"])).await;
    let client = client(&node).await;
    let e = rpc_err(
        &client,
        one(Command::new("w", "mpreg.whoami").datasets(["model-a", "model-c"])),
    )
    .await;
    assert_eq!(e.code, ErrorCode::NoNodeForDatasets);
    assert_eq!(e.command.as_deref(), Some("w"));
    assert!(
        e.message.contains("mpreg.whoami") && e.message.contains("model-c"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn duplicate_name() {
    let node = start_default().await;
    let client = client(&node).await;
    let e = rpc_err(
        &client,
        Request::new()
            .cmd(Command::new("a", "echo").arg(1))
            .cmd(Command::new("b", "echo").arg(2))
            .cmd(Command::new("a", "echo").arg(3)),
    )
    .await;
    assert_eq!(e.code, ErrorCode::DuplicateName);
    assert_eq!(e.command.as_deref(), Some("a"));
    assert!(e.message.contains("'a'"), "{}", e.message);
}

#[tokio::test]
async fn cycle_names_its_commands() {
    let (counted, calls) = counting("counted");
    let node = start_node(builder().function(counted)).await;
    let client = client(&node).await;
    let e = rpc_err(
        &client,
        Request::new()
            .cmd(Command::new("free", "counted").arg(0))
            .cmd(Command::new("x", "echo").arg("z"))
            .cmd(Command::new("y", "echos").arg("x").arg("free"))
            .cmd(Command::new("z", "echo").arg("y")),
    )
    .await;
    assert_eq!(e.code, ErrorCode::Cycle);
    for name in ["x", "y", "z"] {
        assert!(
            e.message.contains(&format!(" {name} ")) || e.message.ends_with(&format!(" {name}")),
            "message names `{name}`: {}",
            e.message
        );
    }
    assert!(!e.message.contains("free"), "{}", e.message);
    let details = e.details.expect("cycle details");
    let mut names: Vec<String> =
        serde_json::from_value(details["cycle"].clone()).expect("cycle is a list of names");
    names.sort();
    assert_eq!(names, ["x", "y", "z"]);
    assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing ran");

    let e = rpc_err(
        &client,
        Request::new()
            .cmd(Command::new("a", "echo").arg("b"))
            .cmd(Command::new("b", "echo").arg("a")),
    )
    .await;
    assert_eq!(e.code, ErrorCode::Cycle);
    assert!(
        e.message.contains('a') && e.message.contains('b'),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn empty_request_is_bad_request() {
    let node = start_default().await;
    let client = client(&node).await;
    let e = rpc_err(&client, Request::new()).await;
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert_eq!(e.command, None);
    assert!(e.message.contains("no commands"), "{}", e.message);

    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    let reply = ws.request(&flat("empty", json!([]))).await;
    err_of(&reply, &json!("empty"), "bad_request");
}

#[tokio::test]
async fn bad_arguments() {
    let node = start_default().await;
    let client = client(&node).await;

    let e = rpc_err(&client, one(Command::new("two", "echo").arg(1).arg(2))).await;
    assert_eq!(e.code, ErrorCode::BadArguments);
    assert_eq!(e.command.as_deref(), Some("two"));
    assert!(e.message.contains("at most 1"), "{}", e.message);

    let e = rpc_err(&client, one(Command::new("s", "debug.sleep").arg("soon"))).await;
    assert_eq!(e.code, ErrorCode::BadArguments);
    assert_eq!(e.command.as_deref(), Some("s"));
    assert!(
        e.message.contains("`ms`") && e.message.contains("u64"),
        "{}",
        e.message
    );

    let e = rpc_err(&client, one(Command::new("none", "debug.sleep"))).await;
    assert_eq!(e.code, ErrorCode::BadArguments);
    assert!(e.message.contains("missing argument `ms`"), "{}", e.message);

    let e = rpc_err(&client, one(Command::new("k", "echo").kwarg("zzz", 1))).await;
    assert_eq!(e.code, ErrorCode::BadArguments);
    assert!(e.message.contains("`zzz`"), "{}", e.message);

    let e = rpc_err(
        &client,
        one(Command::new("both", "echo").arg(1).kwarg("arg", 2)),
    )
    .await;
    assert_eq!(e.code, ErrorCode::BadArguments);
    assert!(e.message.contains("`arg`"), "{}", e.message);

    let e = rpc_err(&client, one(Command::new("es", "echos").kwarg("k", 1))).await;
    assert_eq!(e.code, ErrorCode::BadArguments);
    assert_eq!(e.command.as_deref(), Some("es"));

    let e = rpc_err(&client, one(Command::new("who", "mpreg.whoami").arg(1))).await;
    assert_eq!(e.code, ErrorCode::BadArguments);
}

#[tokio::test]
async fn handler_failed_carries_the_message() {
    let node = start_default().await;
    let client = client(&node).await;
    let e = rpc_err(&client, one(Command::new("f", "debug.fail").arg("boom"))).await;
    assert_eq!(e.code, ErrorCode::HandlerFailed);
    assert_eq!(e.command.as_deref(), Some("f"));
    assert_eq!(e.message, "boom");

    // On the wire too.
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    let reply = ws
        .request(&flat(
            "f",
            json!([cmd("fails", "debug.fail", json!(["boom"]))]),
        ))
        .await;
    let error = err_of(&reply, &json!("f"), "handler_failed");
    assert_eq!(error["message"], "boom");
    assert_eq!(error["command"], "fails");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_is_handler_failed_and_node_keeps_serving() {
    let node = start_default().await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    let reply = ws
        .request(&flat("p", json!([cmd("boom", "debug.panic", json!([]))])))
        .await;
    let error = err_of(&reply, &json!("p"), "handler_failed");
    assert_eq!(error["command"], "boom");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("panic")),
        "{error}"
    );
    // Same connection.
    let reply = ws
        .request(&flat("next", json!([cmd("e", "echo", json!(["alive"]))])))
        .await;
    assert_eq!(ok_r(&reply, &json!("next")), json!({"e": "alive"}));

    // A panic inside a multi-command request, through the Rust client.
    let client = client(&node).await;
    let e = rpc_err(
        &client,
        Request::new()
            .cmd(Command::new("a", "echo").arg(1))
            .cmd(Command::new("p", "debug.panic"))
            .cmd(Command::new("b", "echos").arg("a").arg("p")),
    )
    .await;
    assert_eq!(e.code, ErrorCode::HandlerFailed);
    assert_eq!(e.command.as_deref(), Some("p"));
    let said: String = guard("echo", client.call("echo", ("ok",)))
        .await
        .expect("same client still works");
    assert_eq!(said, "ok");

    // A new connection.
    let fresh = common::client(&node).await;
    let said: String = guard("echo", fresh.call("echo", ("fresh",)))
        .await
        .expect("new connection works");
    assert_eq!(said, "fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_from_request_client_and_node_deadlines() {
    let node = start_default().await;
    let client = client(&node).await;
    let sleep = || Command::new("s", "debug.sleep").arg(10_000);

    // The request's own deadline.
    let e = rpc_err(&client, one(sleep()).timeout(Duration::from_millis(200))).await;
    assert_eq!(e.code, ErrorCode::Timeout);
    assert!(e.message.contains("200 ms"), "{}", e.message);

    // The client's default deadline.
    let short = guard(
        "connect",
        Client::builder()
            .timeout(Duration::from_millis(200))
            .connect(&node.url().expect("node listens")),
    )
    .await
    .expect("connects");
    let e = into_rpc(guard("call", short.call::<u64>("debug.sleep", (10_000,))).await);
    assert_eq!(e.code, ErrorCode::Timeout);

    // The node's default deadline.
    let strict = start_node(builder().request_timeout(Duration::from_millis(200))).await;
    let strict_client = common::client(&strict).await;
    let e = rpc_err(&strict_client, one(sleep())).await;
    assert_eq!(e.code, ErrorCode::Timeout);
    // A quick request on the same node and connection still succeeds.
    let n: u64 = guard("quick", strict_client.call("debug.sleep", (0,)))
        .await
        .expect("quick sleep");
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_command_fails_its_dependents_and_is_named() {
    let (counted, calls) = counting("counted");
    let node = start_node(builder().function(counted)).await;
    let client = client(&node).await;
    let e = rpc_err(
        &client,
        Request::new()
            .cmd(Command::new("ok", "echo").arg(1))
            .cmd(Command::new("bad", "debug.fail").arg("boom"))
            .cmd(Command::new("dependent", "counted").arg("bad").arg("ok"))
            .cmd(Command::new("last", "echo").arg("dependent")),
    )
    .await;
    assert_eq!(e.code, ErrorCode::HandlerFailed);
    assert_eq!(e.command.as_deref(), Some("bad"));
    assert_eq!(e.message, "boom");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "dependent never ran");

    // A failure deeper in a chain names the command that failed, not the
    // last one.
    let e = rpc_err(
        &client,
        Request::new()
            .cmd(Command::new("one", "echo").arg("x"))
            .cmd(Command::new("two", "debug.sleep").arg("one"))
            .cmd(Command::new("three", "echo").arg("two")),
    )
    .await;
    assert_eq!(e.code, ErrorCode::BadArguments);
    assert_eq!(e.command.as_deref(), Some("two"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_beyond_max_inflight_per_connection() {
    let node = start_node(builder().max_inflight_per_connection(2)).await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    ws.feed_json(&flat(
        "slow1",
        json!([cmd("s", "debug.sleep", json!([2000]))]),
    ))
    .await;
    ws.feed_json(&flat(
        "slow2",
        json!([cmd("s", "debug.sleep", json!([2000]))]),
    ))
    .await;
    ws.feed_json(&flat("third", json!([cmd("e", "echo", json!([3]))])))
        .await;
    ws.flush().await;

    let mut replies = std::collections::HashMap::new();
    for _ in 0..3 {
        let reply = ws.recv_json().await;
        let u = reply["u"].as_str().expect("string id").to_owned();
        assert!(replies.insert(u, reply).is_none(), "one reply per request");
    }
    let third = &replies["third"];
    let error = err_of(third, &json!("third"), "overloaded");
    assert!(
        error["message"].as_str().is_some_and(|m| m.contains('2')),
        "message gives the limit: {error}"
    );
    for u in ["slow1", "slow2"] {
        assert_eq!(ok_r(&replies[u], &json!(u)), json!({"s": 2000}), "{u}");
    }

    // Once they are done, the connection takes requests again.
    let reply = ws
        .request(&flat("after", json!([cmd("e", "echo", json!([4]))])))
        .await;
    assert_eq!(ok_r(&reply, &json!("after")), json!({"e": 4}));
    // The limit is per connection: another connection was never affected.
    let other = client(&node).await;
    let n: i64 = guard("echo", other.call("echo", (5,)))
        .await
        .expect("other connection");
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_panicking_before_returning_its_future_is_handler_failed() {
    let eager = mpreg::Function::new("eager.panic", |_args: mpreg::Args| {
        panic!("eager panic");
        #[allow(unreachable_code)]
        std::future::ready(Ok::<_, RpcError>(Value::Null))
    });
    let node = start_node(builder().function(eager)).await;
    let client = client(&node).await;
    for request in [
        one(Command::new("p", "eager.panic")),
        Request::new()
            .cmd(Command::new("a", "echo").arg(1))
            .cmd(Command::new("p", "eager.panic").arg("a")),
    ] {
        let e = rpc_err(&client, request).await;
        assert_eq!(e.code, ErrorCode::HandlerFailed);
        assert_eq!(e.command.as_deref(), Some("p"));
        assert!(e.message.contains("eager panic"), "{}", e.message);
    }
    let n: i64 = guard("echo", client.call("echo", (1,)))
        .await
        .expect("still serving");
    assert_eq!(n, 1);
}

#[tokio::test]
async fn invalid_settings_are_rejected_at_start() {
    for b in [
        builder().max_message_size(100),
        builder().max_inflight_per_connection(0),
    ] {
        match guard("start", b.start()).await {
            Err(Error::Config(e)) => assert!(!e.to_string().is_empty()),
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }
    // A port already in use is an I/O error, not a panic.
    let node = start_default().await;
    let taken = builder().listen(node.local_addr().expect("node listens").to_string());
    assert!(matches!(
        guard("start", taken.start()).await,
        Err(Error::Io(_))
    ));
}
