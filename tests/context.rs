//! Handlers that take a `Context` or a `Dataset<T>`: what the context tells,
//! typed dataset state and its errors, and calls from a handler into the
//! cluster with the deadline and cancellation carried along.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{guard, rpc_error, wait_until};
use mpreg::{
    Args, Command, Context, Dataset, ErrorCode, Function, Node, NodeHandle, Request, RpcError,
};
use serde_json::{Value, json};

/// A model, as an application would load it once per node.
#[derive(Debug)]
struct Model {
    scale: i64,
}

/// Another kind of state, to check that types are told apart.
#[derive(Debug)]
struct Lexicon(Vec<String>);

/// What the context says, with the context in the middle of the
/// parameters (it is not a wire argument).
#[mpreg::rpc]
fn describe_call(a: i64, ctx: Context, b: i64) -> Value {
    json!({
        "sum": a + b,
        "node": ctx.node_name(),
        "datasets": ctx.datasets(),
        "remaining_ms": ctx.remaining().as_millis() as u64,
        "request_id": ctx.request_id(),
    })
}

/// Scales `x` with the model the command named.
#[mpreg::rpc]
fn scale(x: i64, model: Dataset<Model>) -> Value {
    json!({ "value": x * model.scale, "model": model.name() })
}

/// Counts the words of the lexicon the command named, through the context.
#[mpreg::rpc]
async fn lexicon_size(ctx: mpreg::Context) -> Result<usize, RpcError> {
    let lexicon: Dataset<Lexicon> = ctx.dataset()?;
    Ok(lexicon.0.len())
}

/// Calls `shout` (wherever it is) and says where each part ran.
#[mpreg::rpc]
async fn relay(ctx: Context, text: String) -> Result<Value, mpreg::Error> {
    let shouted: String = ctx.call("shout", (&text,)).await?;
    let there: String = ctx
        .call_command(Command::new("w", "mpreg.whoami").dataset("loud"))
        .await?;
    Ok(json!({ "here": ctx.node_name(), "there": there, "shouted": shouted }))
}

/// Calls `debug.sleep` for `ms` milliseconds, wherever it runs.
#[mpreg::rpc]
async fn sleep_via(ctx: Context, ms: u64) -> Result<u64, mpreg::Error> {
    ctx.call_command(Command::new("s", "debug.sleep").arg(ms).dataset("sleepy"))
        .await
}

fn shout() -> Function {
    Function::new("shout", |args: Args| async move {
        match args.positional().first().and_then(Value::as_str) {
            Some(text) if !text.is_empty() => Ok(json!(text.to_uppercase())),
            _ => Err(RpcError::handler_failed("nothing to shout")),
        }
    })
}

fn builder(name: &str) -> mpreg::NodeBuilder {
    Node::builder()
        .name(name)
        .listen("127.0.0.1:0")
        .failure_detection(Duration::from_millis(100), Duration::from_millis(500))
}

async fn start(builder: mpreg::NodeBuilder) -> NodeHandle {
    guard("node start", builder.start())
        .await
        .expect("node starts")
}

async fn one(node: &NodeHandle, command: Command) -> Result<Value, mpreg::Error> {
    let name = command.name.clone();
    guard("request", node.send(Request::new().cmd(command)))
        .await?
        .get(&name)
}

#[tokio::test]
async fn context_tells_node_datasets_deadline_and_request_id() {
    let node = start(builder("ctx-node").datasets(["d1", "d2"])).await;
    let client = guard("connect", mpreg::Client::connect(&node.url().expect("url")))
        .await
        .expect("client connects");
    let reply = guard(
        "describe",
        client.send(
            Request::new()
                .cmd(
                    Command::new("c", "describe_call")
                        .arg(1)
                        .kwarg("b", 41)
                        .datasets(["d2", "d1"]),
                )
                .timeout(Duration::from_secs(20)),
        ),
    )
    .await
    .expect("request runs");
    let seen: Value = reply.get("c").expect("result");
    assert_eq!(seen["sum"], 42);
    assert_eq!(seen["node"], "ctx-node");
    assert_eq!(seen["datasets"], json!(["d2", "d1"]));
    let remaining = seen["remaining_ms"].as_u64().expect("a number");
    assert!(
        remaining > 0 && remaining <= 20_000,
        "remaining {remaining} ms of a 20 s deadline"
    );
    assert!(
        !seen["request_id"].as_str().expect("a string").is_empty(),
        "{seen}"
    );

    // The context and the dataset are not wire parameters.
    let described: Value = guard("functions", client.call("mpreg.functions", ()))
        .await
        .expect("functions");
    let params = |name: &str| -> Value {
        described
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["name"] == name))
            .map(|f| f["params"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        params("describe_call"),
        json!([{"name": "a", "type": "i64"}, {"name": "b", "type": "i64"}])
    );
    assert_eq!(params("scale"), json!([{"name": "x", "type": "i64"}]));
    assert_eq!(params("lexicon_size"), json!([]));

    // A third positional argument has no parameter to go to.
    let e = rpc_error(
        one(&node, Command::new("c", "describe_call").args([1, 2, 3])).await,
        ErrorCode::BadArguments,
    );
    assert_eq!(e.code, ErrorCode::BadArguments);
    assert!(e.message.contains("a: i64, b: i64"), "{}", e.message);
    node.shutdown().await;
}

#[tokio::test]
async fn dataset_state_is_the_one_the_command_named() {
    let node = start(
        builder("models")
            .dataset("small", Model { scale: 2 })
            .dataset("large", Model { scale: 100 })
            .dataset("words", Lexicon(vec!["a".into(), "b".into(), "c".into()]))
            .datasets(["plain"]),
    )
    .await;

    let small = one(&node, Command::new("s", "scale").arg(5).dataset("small"))
        .await
        .expect("small model");
    assert_eq!(small, json!({"value": 10, "model": "small"}));
    // Other datasets named beside it, with other types or none, are fine.
    let large = one(
        &node,
        Command::new("s", "scale")
            .arg(5)
            .datasets(["words", "large", "plain"]),
    )
    .await
    .expect("large model");
    assert_eq!(large, json!({"value": 500, "model": "large"}));
    let words = one(&node, Command::new("w", "lexicon_size").dataset("words"))
        .await
        .expect("lexicon");
    assert_eq!(words, json!(3));

    // Named none: a clear error naming the type and the datasets that fit.
    let e = rpc_error(
        one(&node, Command::new("s", "scale").arg(5)).await,
        ErrorCode::BadArguments,
    );
    assert_eq!(e.code, ErrorCode::BadArguments);
    assert!(e.message.contains("Model"), "{}", e.message);
    assert!(e.message.contains("named none"), "{}", e.message);
    let offered = e.details.as_ref().map(|d| d["datasets"].clone());
    assert_eq!(offered, Some(json!(["large", "small"])));
    assert_eq!(e.command.as_deref(), Some("s"));

    // Named only datasets of other types.
    let e = rpc_error(
        one(&node, Command::new("s", "scale").arg(5).dataset("words")).await,
        ErrorCode::BadArguments,
    );
    assert_eq!(e.code, ErrorCode::BadArguments);
    assert!(e.message.contains("only [\"words\"]"), "{}", e.message);

    // Named two that fit: ambiguous, and nothing runs.
    let e = rpc_error(
        one(
            &node,
            Command::new("s", "scale")
                .arg(5)
                .datasets(["small", "large"]),
        )
        .await,
        ErrorCode::BadArguments,
    );
    assert_eq!(e.code, ErrorCode::BadArguments);
    assert!(e.message.contains("name exactly one"), "{}", e.message);

    // Through the context too: the handler's `?` keeps the error's code.
    let e = rpc_error(
        one(&node, Command::new("w", "lexicon_size").dataset("small")).await,
        ErrorCode::BadArguments,
    );
    assert_eq!(e.code, ErrorCode::BadArguments);
    assert!(e.message.contains("Lexicon"), "{}", e.message);
    assert_eq!(e.command.as_deref(), Some("w"));

    // A dataset no node has cannot be routed at all.
    let e = rpc_error(
        one(&node, Command::new("s", "scale").arg(5).dataset("huge")).await,
        ErrorCode::NoNodeForDatasets,
    );
    assert_eq!(e.code, ErrorCode::NoNodeForDatasets);
    node.shutdown().await;
}

#[tokio::test]
async fn runtime_functions_reach_the_context_through_their_args() {
    let sizes = Function::new("size_of", |args: Args| async move {
        let ctx = args
            .context()
            .ok_or_else(|| RpcError::handler_failed("no context"))?;
        let lexicon: Dataset<Lexicon> = ctx.dataset()?;
        Ok::<_, RpcError>(json!({ "node": ctx.node_name(), "size": lexicon.0.len() }))
    });
    let node = start(
        builder("runtime")
            .without_linked_functions()
            .dataset("words", Lexicon(vec!["x".into()]))
            .function(sizes),
    )
    .await;
    let got = one(&node, Command::new("n", "size_of").dataset("words"))
        .await
        .expect("runs");
    assert_eq!(got, json!({"node": "runtime", "size": 1}));
    // Arguments built by hand have no context.
    assert!(Args::default().context().is_none());
    node.shutdown().await;
}

/// Two nodes: `relay` runs on A (the only one with dataset `relay-here`),
/// `shout` and dataset `loud` only on B.
#[tokio::test]
async fn handlers_call_functions_on_other_nodes() {
    let b = start(
        builder("B")
            .without_linked_functions()
            .function(shout())
            .datasets(["loud"]),
    )
    .await;
    let a = start(
        builder("A")
            .without_function("shout")
            .datasets(["relay-here"])
            .peers([b.url().expect("url")]),
    )
    .await;
    let routable = a
        .wait_for(common::HANG_GUARD, |view| view.offers("shout", &[]))
        .await;
    assert!(routable, "A never learned of B's `shout`");

    let client = guard("connect", mpreg::Client::connect(&b.url().expect("url")))
        .await
        .expect("client connects");
    // Sent to B; `relay` runs on A, whose calls run back on B.
    let got: Value = guard(
        "relay",
        client.call_command(
            Command::new("r", "relay")
                .arg("hello")
                .dataset("relay-here"),
        ),
    )
    .await
    .expect("relay runs");
    assert_eq!(
        got,
        json!({ "here": "A", "there": "B", "shouted": "HELLO" })
    );

    // A failing inner call fails the outer command with its message.
    let e = rpc_error(
        one(&a, Command::new("r", "relay").arg("").dataset("relay-here")).await,
        ErrorCode::HandlerFailed,
    );
    assert_eq!(e.code, ErrorCode::HandlerFailed);
    assert!(e.message.contains("nothing to shout"), "{}", e.message);
    assert_eq!(e.command.as_deref(), Some("r"));
    a.shutdown().await;
    b.shutdown().await;
}

/// B runs `debug.sleep` with dataset `sleepy`, A runs `sleep_via`. A request
/// with a short deadline that calls through A into B times out, and B's
/// sleep is cancelled (its load drops back to zero) long before it would
/// have finished.
#[tokio::test]
async fn deadline_and_cancellation_follow_calls_from_handlers() {
    let b = start(
        builder("B")
            .without_linked_functions()
            .diagnostics(true)
            .datasets(["sleepy"]),
    )
    .await;
    let a = start(
        builder("A")
            .without_function("debug.sleep")
            .peers([b.url().expect("url")]),
    )
    .await;
    let routable = a
        .wait_for(common::HANG_GUARD, |view| {
            view.nodes_with_dataset("sleepy") > 0
        })
        .await;
    assert!(routable, "A never learned of B's `sleepy`");

    // Short deadline: the inner call gets only what is left of it. While
    // the request runs, B runs the sleep.
    let b_load = |view: &mpreg::ClusterView| view.this().map(|n| n.load);
    let (outcome, reached_b) = guard("deadline", async {
        tokio::join!(
            a.send(
                Request::new()
                    .cmd(Command::new("s", "sleep_via").arg(60_000))
                    .timeout(Duration::from_millis(1_000)),
            ),
            b.wait_for(common::HANG_GUARD, |view| b_load(view) == Some(1)),
        )
    })
    .await;
    assert!(reached_b, "the inner call never ran on B");
    match outcome {
        Err(mpreg::Error::Rpc(e)) => assert_eq!(e.code, ErrorCode::Timeout, "{e}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    // B's sleep was cancelled, not left to run for a minute.
    let idle = b
        .wait_for(common::HANG_GUARD, |view| b_load(view) == Some(0))
        .await;
    assert!(
        idle,
        "B still runs the sleep: {:?}",
        b_load(&b.cluster_view())
    );

    // A context kept past its request's deadline (by a task the handler
    // spawned) refuses to call: its deadline has passed.
    let late = Arc::new(AtomicUsize::new(0));
    let seen = late.clone();
    let after = Function::new("after_deadline", move |args: Args| {
        let seen = seen.clone();
        async move {
            let ctx = args
                .context()
                .cloned()
                .ok_or_else(|| RpcError::handler_failed("no context"))?;
            tokio::spawn(async move {
                tokio::time::sleep_until(ctx.deadline().into()).await;
                let refused = ctx.call::<Value>("echo", ("x",)).await;
                if matches!(&refused, Err(mpreg::Error::Rpc(e)) if e.code == ErrorCode::Timeout) {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            });
            Ok::<_, RpcError>(Value::Null)
        }
    });
    a.register(after);
    guard(
        "after_deadline",
        a.send(
            Request::new()
                .cmd(Command::new("l", "after_deadline"))
                .timeout(Duration::from_millis(100)),
        ),
    )
    .await
    .expect("the handler itself returns at once");
    wait_until("the late call to be refused", || {
        late.load(Ordering::SeqCst) == 1
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

/// Calls `echo` from a blocking handler, by blocking on the call.
#[mpreg::rpc(blocking)]
fn echo_from_blocking(ctx: Context, text: String) -> Result<String, mpreg::Error> {
    tokio::runtime::Handle::current().block_on(ctx.call("echo", (text,)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_handlers_call_through_the_context() {
    let node = start(builder("blocking")).await;
    let got = one(
        &node,
        Command::new("b", "echo_from_blocking").arg("from the pool"),
    )
    .await
    .expect("runs");
    assert_eq!(got, json!("from the pool"));
    node.shutdown().await;
}
