//! Streaming per-command results (`"stream": true`): each command's result
//! arrives as soon as it exists, before later commands finish, then the
//! final reply; requests without it get exactly the one reply they always
//! did.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{RawWs, builder, cmd, flat, guard, nested, ok_r, start_node, url};
use mpreg::{
    Args, Client, Command, Error, ErrorCode, Event, Function, Node, Request, ResultStream, RpcError,
};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// A gate: each call of its function waits for one pass.
#[derive(Clone)]
struct Gate(Arc<Semaphore>);

impl Gate {
    fn new() -> Self {
        Self(Arc::new(Semaphore::new(0)))
    }

    /// Lets one waiting (or future) call through.
    fn pass_one(&self) {
        self.0.add_permits(1);
    }

    /// A function `gate` that returns its first argument once it may pass.
    fn function(&self) -> Function {
        let gate = self.0.clone();
        Function::new("gate", move |args: Args| {
            let gate = gate.clone();
            async move {
                let pass = gate
                    .acquire()
                    .await
                    .map_err(|_| RpcError::handler_failed("gate closed for good"))?;
                pass.forget();
                Ok::<_, RpcError>(args.positional().first().cloned().unwrap_or(Value::Null))
            }
        })
    }
}

/// The next event, which must be a command's progress: its name and value.
async fn progress(events: &mut ResultStream) -> (String, Value) {
    match guard("next event", events.next()).await {
        Some(Ok(Event::Progress(p))) => p.into_parts(),
        other => panic!("expected a progress event, got {other:?}"),
    }
}

/// The next event, which must be the final results.
async fn done(events: &mut ResultStream) -> mpreg::Results {
    match guard("next event", events.next()).await {
        Some(Ok(Event::Done(results))) => results,
        other => panic!("expected the final results, got {other:?}"),
    }
}

/// `first` → `held` (waits on the gate) → `last`.
fn gated_pipeline() -> Request {
    Request::new()
        .cmd(Command::new("first", "echo").arg("hi"))
        .cmd(Command::new("held", "gate").arg("first"))
        .cmd(Command::new("last", "echos").arg("held").arg("done"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_result_streams_before_later_commands_finish() {
    let gate = Gate::new();
    let node = start_node(builder().function(gate.function())).await;
    let client = common::client(&node).await;

    let mut events = guard("stream", client.stream(gated_pipeline()))
        .await
        .expect("request sent");
    // The gate is still shut: `first` has finished, `held` has not.
    assert_eq!(progress(&mut events).await, ("first".into(), json!("hi")));
    gate.pass_one();
    assert_eq!(progress(&mut events).await, ("held".into(), json!("hi")));
    let (name, value) = progress(&mut events).await;
    assert_eq!((name.as_str(), &value), ("last", &json!(["hi", "done"])));
    let results = done(&mut events).await;
    assert_eq!(results.get::<Value>("last").expect("sink"), value);
    assert_eq!(results.len(), 1, "the reply carries the sinks, as always");
    assert!(guard("end", events.next()).await.is_none(), "nothing after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_results_and_typed_progress() {
    let node = start_node(builder()).await;
    let client = common::client(&node).await;
    let request = Request::new()
        .cmd(Command::new("n", "echo").arg(41))
        .cmd(Command::new("pair", "echos").arg("n").arg(1))
        .return_intermediate_results(true);
    let mut events = guard("stream", client.stream(request)).await.expect("sent");
    let first = match guard("event", events.next()).await {
        Some(Ok(Event::Progress(p))) => p,
        other => panic!("{other:?}"),
    };
    assert_eq!(first.name(), "n");
    assert_eq!(first.get::<i64>().expect("typed"), 41);
    assert!(first.get::<String>().is_err(), "wrong type is an error");
    assert_eq!(progress(&mut events).await, ("pair".into(), json!([41, 1])));
    let results = guard("finish", events.finish()).await.expect("results");
    assert_eq!(results.len(), 2);
    assert_eq!(results.get::<i64>("n").expect("n"), 41);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_on_a_peer_stream_one_by_one() {
    let gate = Gate::new();
    let a = start_node(
        Node::builder()
            .name("A")
            .listen("127.0.0.1:0")
            .without_linked_functions()
            .failure_detection(Duration::from_millis(100), Duration::from_millis(500)),
    )
    .await;
    let b = start_node(
        Node::builder()
            .name("B")
            .listen("127.0.0.1:0")
            .without_linked_functions()
            .datasets(["model-b"])
            .function(gate.function())
            .peers([url(&a)])
            .failure_detection(Duration::from_millis(100), Duration::from_millis(500)),
    )
    .await;
    let ready = a
        .wait_for(common::HANG_GUARD, |view| view.offers("gate", &[]))
        .await;
    assert!(ready, "A learns B's functions: {:?}", a.cluster_view());

    // Both commands run on B; without streaming they would travel there
    // as one job and their results come back together.
    let client = common::client(&a).await;
    let request = Request::new()
        .cmd(Command::new("who", "mpreg.whoami").dataset("model-b"))
        .cmd(Command::new("held", "gate").arg("who").dataset("model-b"));
    let mut events = guard("stream", client.stream(request)).await.expect("sent");
    assert_eq!(progress(&mut events).await, ("who".into(), json!("B")));
    gate.pass_one();
    assert_eq!(progress(&mut events).await, ("held".into(), json!("B")));
    let results = done(&mut events).await;
    assert_eq!(results.get::<String>("held").expect("sink"), "B");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_mid_pipeline_comes_after_the_progress_before_it() {
    let node = start_node(builder()).await;
    let client = common::client(&node).await;
    let request = Request::new()
        .cmd(Command::new("ok", "echo").arg("fine"))
        .cmd(Command::new("bad", "debug.fail").arg("ok"))
        .cmd(Command::new("never", "echo").arg("bad"));
    let mut events = guard("stream", client.stream(request)).await.expect("sent");
    assert_eq!(progress(&mut events).await, ("ok".into(), json!("fine")));
    match guard("event", events.next()).await {
        Some(Err(Error::Rpc(e))) => {
            assert_eq!(e.code, ErrorCode::HandlerFailed);
            assert_eq!(e.command.as_deref(), Some("bad"));
        }
        other => panic!("expected the request's error, got {other:?}"),
    }
    assert!(guard("end", events.next()).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_stream_there_is_exactly_one_message() {
    let node = start_node(builder()).await;
    let mut ws = RawWs::connect(&url(&node)).await;
    let chain = json!([
        cmd("first", "echo", json!(["hi there!"])),
        cmd("second", "echo", json!(["first"])),
    ]);

    // Byte for byte what a reply always was.
    ws.send_json(&flat("r1", chain.clone())).await;
    match ws.next_frame().await {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => assert_eq!(
            text.as_str(),
            r#"{"role":"rpc-response","u":"r1","r":{"second":"hi there!"},"error":null}"#
        ),
        other => panic!("expected the reply, got {other:?}"),
    }
    // The next message answers the next request: nothing else came for r1.
    let reply = ws.request(&nested("r2", chain.clone())).await;
    assert_eq!(ok_r(&reply, &json!("r2")), json!({"second": "hi there!"}));
    let mut off = flat("r3", chain);
    off["stream"] = json!(false);
    let reply = ws.request(&off).await;
    assert_eq!(ok_r(&reply, &json!("r3")), json!({"second": "hi there!"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_on_the_wire_in_either_envelope() {
    let node = start_node(builder()).await;
    let mut ws = RawWs::connect(&url(&node)).await;
    let chain = json!([
        cmd("first", "echo", json!(["hi there!"])),
        cmd("second", "echos", json!(["first", 2])),
    ]);
    let mut request = flat("s1", chain.clone());
    request["stream"] = json!(true);
    let mut nested_request = nested(7, chain);
    nested_request["rpc"]["stream"] = json!(true);
    for (request, u) in [(request, json!("s1")), (nested_request, json!(7))] {
        ws.send_json(&request).await;
        assert_eq!(
            ws.recv_json().await,
            json!({"role": "rpc-progress", "u": u, "name": "first", "value": "hi there!"})
        );
        assert_eq!(
            ws.recv_json().await,
            json!({"role": "rpc-progress", "u": u, "name": "second", "value": ["hi there!", 2]})
        );
        let reply = ws.recv_json().await;
        assert_eq!(reply["role"], "rpc-response");
        assert_eq!(ok_r(&reply, &u), json!({"second": ["hi there!", 2]}));
    }

    // A `stream` that is not a boolean is a bad request, on a connection
    // that stays open.
    let mut bad = flat("b", json!([cmd("a", "echo", json!([1]))]));
    bad["stream"] = json!("yes");
    let reply = ws.request(&bad).await;
    let e = common::err_of(&reply, &json!("b"), "bad_request");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("stream")));
    let reply = ws
        .request(&flat("c", json!([cmd("a", "echo", json!([1]))])))
        .await;
    assert_eq!(ok_r(&reply, &json!("c")), json!({"a": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_plain_calls_share_one_connection() {
    let gate = Gate::new();
    let node = start_node(builder().function(gate.function())).await;
    let client: Client = common::client(&node).await;

    let mut kept = guard("stream", client.stream(gated_pipeline()))
        .await
        .expect("sent");
    let mut dropped = guard("stream", client.stream(gated_pipeline()))
        .await
        .expect("sent");
    assert_eq!(progress(&mut kept).await, ("first".into(), json!("hi")));
    assert_eq!(progress(&mut dropped).await, ("first".into(), json!("hi")));
    // Plain calls go through while both streams wait on the gate.
    for i in 0..5 {
        let got: i64 = guard("plain call", client.call("echo", (i,)))
            .await
            .expect("plain call");
        assert_eq!(got, i);
    }
    // One stream's caller stops listening: what the node still sends for
    // it is dropped, and nothing else is disturbed.
    drop(dropped);
    gate.pass_one();
    gate.pass_one();
    assert_eq!(progress(&mut kept).await, ("held".into(), json!("hi")));
    let (name, _) = progress(&mut kept).await;
    assert_eq!(name, "last");
    let results = done(&mut kept).await;
    assert_eq!(
        results.get::<Value>("last").expect("sink"),
        json!(["hi", "done"])
    );
    let both: Vec<i64> = guard("plain call", client.call("echos", (1, 2)))
        .await
        .expect("still fine");
    assert_eq!(both, [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_each_result_as_it_arrives() {
    let node = start_node(builder()).await;
    let file = std::env::temp_dir().join(format!("mpreg-stream-{}.json", std::process::id()));
    let example = mpreg::demo::reference_examples()
        .into_iter()
        .last()
        .expect("five examples");
    std::fs::write(
        &file,
        serde_json::to_string(&example.request.cmds).expect("json"),
    )
    .expect("write request file");
    let out = guard(
        "mpreg client --stream",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_mpreg"))
            .arg("client")
            .arg(url(&node))
            .arg("request")
            .arg(&file)
            .arg("--stream")
            .output(),
    )
    .await
    .expect("runs");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let mut lines = stdout.lines();
    let mut streamed = Vec::new();
    for _ in 0..example.request.cmds.len() {
        let line: Value = serde_json::from_str(lines.next().expect("a progress line"))
            .expect("each progress line is JSON");
        streamed.push(line["name"].as_str().expect("name").to_owned());
    }
    assert_eq!(streamed, ["|first", "|second", "|third", "|4th"]);
    let rest: Value = serde_json::from_str(&lines.collect::<Vec<_>>().join("\n")).expect("final");
    assert_eq!(rest, example.expected);
}
