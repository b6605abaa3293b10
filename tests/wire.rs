//! The wire protocol with raw WebSocket frames, as a non-Rust (e.g. the
//! original Python) client speaks it: both envelopes, text and binary
//! frames, malformed input, pipelining, and message size limits.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{RawWs, builder, cmd, err_of, flat, guard, nested, ok_r, start_default, start_node};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn first_release_and_flat_envelopes_both_work() {
    let node = start_default().await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    let cmds = json!([
        cmd("|first", "echo", json!(["hi there!"])),
        cmd("|second", "echo", json!(["|first"])),
        cmd("|third", "echos", json!(["|first", "AND ME TOO"])),
    ]);
    let expected = json!({"|second": "hi there!", "|third": ["hi there!", "AND ME TOO"]});

    let u = json!("01JNESTED");
    let reply = ws.request(&nested(u.clone(), cmds.clone())).await;
    assert_eq!(ok_r(&reply, &u), expected);

    let u = json!("01JFLAT");
    let reply = ws.request(&flat(u.clone(), cmds.clone())).await;
    assert_eq!(ok_r(&reply, &u), expected);

    // A numeric id comes back as the same number.
    let u = json!(42);
    let reply = ws.request(&flat(u.clone(), cmds)).await;
    assert_eq!(ok_r(&reply, &u), expected);

    // Commands may omit args/kwargs/locs; options sit beside `cmds` inside
    // `rpc` in the first-release envelope.
    let reply = ws
        .request(&json!({"role": "rpc", "rpc": {
            "u": "opts",
            "cmds": [{"name": "a", "fun": "echos"}, {"name": "b", "fun": "echo", "args": ["a"]}],
            "timeout_ms": 30000,
            "return_intermediate_results": true,
        }}))
        .await;
    assert_eq!(ok_r(&reply, &json!("opts")), json!({"a": [], "b": []}));
}

#[tokio::test]
async fn binary_frame_request_gets_a_text_reply() {
    let node = start_default().await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    let request = flat("bin", json!([cmd("first", "echo", json!(["hi there!"]))]));
    ws.send_binary(request.to_string().as_bytes()).await;
    let frame = ws.next_frame().await;
    let Some(Ok(Message::Text(text))) = frame else {
        panic!("expected a text reply frame, got {frame:?}")
    };
    let reply: Value = serde_json::from_str(text.as_str()).expect("JSON reply");
    assert_eq!(ok_r(&reply, &json!("bin")), json!({"first": "hi there!"}));
}

#[tokio::test]
async fn malformed_json_gets_bad_request_and_connection_stays_open() {
    let node = start_default().await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    let null = Value::Null;

    ws.send_text("{not json").await;
    let reply = ws.recv_json().await;
    err_of(&reply, &null, "bad_request");
    assert!(reply.get("u").is_some(), "`u` is present (null): {reply}");

    // Also as a binary frame, and JSON that is not an object.
    ws.send_binary(b"\xff\xfe garbage").await;
    err_of(&ws.recv_json().await, &null, "bad_request");
    ws.send_text("[1, 2, 3]").await;
    err_of(&ws.recv_json().await, &null, "bad_request");

    let reply = ws
        .request(&flat(
            "after",
            json!([cmd("e", "echo", json!(["still here"]))]),
        ))
        .await;
    assert_eq!(ok_r(&reply, &json!("after")), json!({"e": "still here"}));
}

#[tokio::test]
async fn request_without_u_gets_bad_request_with_null_u() {
    let node = start_default().await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    for request in [
        json!({"role": "rpc", "cmds": [cmd("e", "echo", json!([1]))]}),
        json!({"role": "rpc", "rpc": {"cmds": [cmd("e", "echo", json!([1]))]}}),
        json!({"role": "rpc", "u": {"not": "an id"}, "cmds": [cmd("e", "echo", json!([1]))]}),
    ] {
        let reply = ws.request(&request).await;
        let error = err_of(&reply, &Value::Null, "bad_request");
        assert!(
            error["message"].as_str().is_some_and(|m| m.contains("`u`")),
            "message mentions the id: {error}"
        );
    }
    // And the connection still serves.
    let reply = ws
        .request(&flat("ok", json!([cmd("e", "echo", json!([1]))])))
        .await;
    assert_eq!(ok_r(&reply, &json!("ok")), json!({"e": 1}));
}

#[tokio::test]
async fn wrong_field_types_get_bad_request_with_the_request_id() {
    let node = start_default().await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    let good = || json!([cmd("e", "echo", json!([1]))]);
    let cases = [
        (
            "cmds-not-array",
            json!({"role": "rpc", "mpreg": 1, "u": "cmds-not-array", "cmds": {"name": "e"}}),
            "cmds",
        ),
        (
            "cmds-missing",
            json!({"role": "rpc", "mpreg": 1, "u": "cmds-missing"}),
            "cmds",
        ),
        (
            "args-not-array",
            flat(
                "args-not-array",
                json!([{"name": "e", "fun": "echo", "args": "x"}]),
            ),
            "command #0",
        ),
        (
            "fun-missing",
            flat("fun-missing", json!([{"name": "e", "args": [1]}])),
            "command #0",
        ),
        (
            "timeout-string",
            json!({"role": "rpc", "mpreg": 1, "u": "timeout-string", "cmds": good(), "timeout_ms": "soon"}),
            "timeout_ms",
        ),
        (
            "nested-timeout-string",
            json!({"role": "rpc", "rpc": {"u": "nested-timeout-string", "cmds": good(), "timeout_ms": "soon"}}),
            "timeout_ms",
        ),
        (
            "intermediate-not-bool",
            json!({"role": "rpc", "mpreg": 1, "u": "intermediate-not-bool", "cmds": good(), "return_intermediate_results": "yes"}),
            "return_intermediate_results",
        ),
        (
            "wrong-role",
            json!({"role": "peer", "mpreg": 1, "u": "wrong-role", "cmds": good()}),
            "role",
        ),
    ];
    for (u, request, mentions) in cases {
        let reply = ws.request(&request).await;
        let error = err_of(&reply, &json!(u), "bad_request");
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains(mentions)),
            "{u}: message should mention `{mentions}`: {error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_once_each_out_of_order() {
    let node = start_default().await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    const N: u64 = 20;
    // Earlier requests sleep longer, so later ones finish first.
    let sleep_of = |i: u64| (N - 1 - i) * 40;
    for i in 0..N {
        let request = flat(
            format!("p{i}"),
            json!([cmd("s", "debug.sleep", json!([sleep_of(i)]))]),
        );
        ws.feed_json(&request).await;
    }
    ws.flush().await;

    let mut order = Vec::new();
    let mut seen: HashMap<String, u64> = HashMap::new();
    for _ in 0..N {
        let reply = ws.recv_json().await;
        let u = reply["u"].as_str().expect("string id").to_owned();
        let i: u64 = u[1..].parse().expect("id p<i>");
        assert_eq!(ok_r(&reply, &json!(u)), json!({"s": sleep_of(i)}), "{u}");
        *seen.entry(u).or_default() += 1;
        order.push(i);
    }
    assert_eq!(seen.len(), N as usize, "every request answered: {order:?}");
    assert!(seen.values().all(|&n| n == 1), "each exactly once");
    let sent: Vec<u64> = (0..N).collect();
    assert_ne!(
        order, sent,
        "replies should come in completion order, not send order"
    );
    // Nothing more arrives: one more request's reply is the next frame.
    let reply = ws
        .request(&flat("last", json!([cmd("e", "echo", json!([0]))])))
        .await;
    assert_eq!(ok_r(&reply, &json!("last")), json!({"e": 0}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_closes_only_its_connection() {
    const LIMIT: usize = 64 * 1024;
    let node = start_node(builder().max_message_size(LIMIT)).await;
    let mut other = RawWs::connect(&node.url().expect("node listens")).await;
    let reply = other
        .request(&flat("o1", json!([cmd("e", "echo", json!([1]))])))
        .await;
    assert_eq!(ok_r(&reply, &json!("o1")), json!({"e": 1}));

    // Just under the limit is fine.
    let near = "n".repeat(LIMIT - 1024);
    let reply = other
        .request(&flat("near", json!([cmd("e", "echo", json!([near]))])))
        .await;
    assert_eq!(
        ok_r(&reply, &json!("near"))["e"].as_str().map(str::len),
        Some(near.len())
    );

    let mut big = RawWs::connect(&node.url().expect("node listens")).await;
    let huge = "h".repeat(LIMIT + 36 * 1024);
    let frame = flat("too-big", json!([cmd("e", "echo", json!([huge]))])).to_string();
    // The node may reset the connection while we are still writing.
    let _ = big.try_send(Message::text(frame)).await;
    let code = big.expect_closed().await;
    if let Some(code) = code {
        assert_eq!(code, 1009, "close code is 'message too big'");
    }

    // The other connection, and new ones, are unaffected.
    let reply = other
        .request(&flat("o2", json!([cmd("e", "echo", json!([2]))])))
        .await;
    assert_eq!(ok_r(&reply, &json!("o2")), json!({"e": 2}));
    let mut fresh = RawWs::connect(&node.url().expect("node listens")).await;
    let reply = fresh
        .request(&flat("f", json!([cmd("e", "echo", json!([3]))])))
        .await;
    assert_eq!(ok_r(&reply, &json!("f")), json!({"e": 3}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_frame_over_16_mib_is_accepted_and_echoed_intact() {
    let node = start_default().await; // default limit: 64 MiB
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    let size = 17 << 20;
    let pattern = "0123456789abcdefghijklmnopqrstuv";
    let big: String = pattern.repeat(size / pattern.len());
    assert!(big.len() > 16 << 20);
    let request = flat("big", json!([cmd("e", "echo", json!([big]))]));
    // tungstenite sends one message as one frame.
    ws.send_text(&request.to_string()).await;
    drop(request);
    let reply = guard("big reply", ws.recv_json()).await;
    assert_eq!(reply["u"], "big");
    assert_eq!(reply["error"], Value::Null, "error: {}", reply["error"]);
    let echoed = reply["r"]["e"].as_str().expect("string result");
    assert_eq!(echoed.len(), big.len());
    assert!(echoed == big, "echoed string differs from the one sent");
}

#[tokio::test]
async fn ping_gets_a_pong_and_the_connection_goes_on() {
    // Python `websockets` clients ping every 20 s and drop connections that
    // do not answer.
    let node = start_default().await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    ws.try_send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .expect("send ping");
    let frame = ws.next_any_frame().await;
    match frame {
        Some(Ok(Message::Pong(payload))) => assert_eq!(&payload[..], b"are you there"),
        other => panic!("expected a pong, got {other:?}"),
    }
    let reply = ws
        .request(&flat("after-ping", json!([cmd("e", "echo", json!([1]))])))
        .await;
    assert_eq!(ok_r(&reply, &json!("after-ping")), json!({"e": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_raw_connections_as_going_away() {
    let node = start_default().await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    let reply = ws
        .request(&flat("x", json!([cmd("e", "echo", json!([1]))])))
        .await;
    assert_eq!(ok_r(&reply, &json!("x")), json!({"e": 1}));
    guard("shutdown", node.shutdown()).await;
    if let Some(code) = ws.expect_closed().await {
        assert_eq!(code, 1001, "close code is 'going away'");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_completes_when_a_client_stops_reading() {
    let node = start_node(builder().shutdown_grace(Duration::from_millis(300))).await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    // Far more reply bytes than loopback socket buffers hold; never read.
    let mib = "m".repeat(1 << 20);
    for i in 0..32 {
        ws.feed_json(&flat(
            format!("big{i}"),
            json!([cmd("e", "echo", json!([mib]))]),
        ))
        .await;
    }
    ws.flush().await;
    // The node is up and serving others.
    let observer = common::client(&node).await;
    let n: i64 = guard("observer", observer.call("echo", (1,)))
        .await
        .expect("observer");
    assert_eq!(n, 1);
    // Shutdown must be bounded by the grace period even though this client
    // never reads its replies.
    guard("shutdown with a stalled client", node.shutdown()).await;
    drop(ws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_cross_a_hop_as_sent_and_bad_ones_are_bad_requests() {
    // The entry node forwards arguments and results as raw JSON text: what
    // comes back must be what a tree would have given, and a frame a tree
    // parse refuses is refused as before (not valid JSON), with its id.
    let b = start_node(builder().name("B").datasets(["b"])).await;
    let a = start_node(builder().name("A").peers([b.url().expect("B listens")])).await;
    let seen = a
        .wait_for(common::HANG_GUARD, |v| v.nodes_with_dataset("b") > 0)
        .await;
    assert!(seen, "A never saw B's dataset");
    let mut ws = RawWs::connect(&a.url().expect("A listens")).await;

    let values = json!([
        1.5e30,
        2.5E-7,
        -0.0,
        18_446_744_073_709_551_615u64,
        -9_223_372_036_854_775_808i64,
        "caf\u{e9} \u{1F600} \"quoted\" back\\slash",
        {"z": [1, {"y": null}], "a": true},
        [],
        {}
    ]);
    // Spaces and escapes as a client might write them.
    let frame = format!(
        r#"{{ "role" : "rpc", "mpreg" : 1, "u" : "hop", "cmds" : [ {{ "name" : "e", "fun" : "echo", "args" : [ {} ], "locs" : [ "b" ] }} ] }}"#,
        serde_json::to_string_pretty(&values).expect("json")
    );
    ws.send_text(&frame).await;
    let reply = guard("hop reply", ws.recv_json()).await;
    assert_eq!(ok_r(&reply, &json!("hop")), json!({ "e": values }));
    // A `\u` escape of a surrogate pair goes the plain way and still works.
    let pair = r#"{"mpreg":1,"u":"pair","cmds":[{"name":"e","fun":"echo","args":["\ud83d\ude00"],"locs":["b"]}]}"#;
    ws.send_text(pair).await;
    let reply = guard("pair reply", ws.recv_json()).await;
    assert_eq!(ok_r(&reply, &json!("pair")), json!({ "e": "\u{1F600}" }));

    for (u, arg) in [
        ("range", "1e999"),
        ("surrogate", r#""\ud800""#),
        ("deep", &format!("{}1{}", "[".repeat(200), "]".repeat(200))),
    ] {
        let frame = format!(
            r#"{{"mpreg":1,"u":"{u}","cmds":[{{"name":"e","fun":"echo","args":[{arg}],"locs":["b"]}}]}}"#
        );
        ws.send_text(&frame).await;
        let reply = guard("bad reply", ws.recv_json()).await;
        // Not valid JSON, yet the id before the bad value is readable.
        let e = err_of(&reply, &json!(u), "bad_request");
        assert!(
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("not valid JSON")),
            "{u}: {e}"
        );
    }
    // The link and the connection still work.
    ws.send_text(
        r#"{"mpreg":1,"u":"after","cmds":[{"name":"e","fun":"echo","args":[[1,2]],"locs":["b"]}]}"#,
    )
    .await;
    let reply = guard("after reply", ws.recv_json()).await;
    assert_eq!(ok_r(&reply, &json!("after")), json!({ "e": [1, 2] }));
}

#[tokio::test]
async fn every_refusal_carries_a_readable_id() {
    let mut config = mpreg::Config::default();
    config.max_commands_per_request = 4;
    let node = start_node(
        mpreg::Node::builder()
            .config(config)
            .listen("127.0.0.1:0")
            .without_linked_functions(),
    )
    .await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
    let echo_deep = format!(r#"{{"name":"e","fun":"echo","args":[{deep}]}}"#);
    let many = json!(
        (0..5)
            .map(|i| cmd(&format!("c{i}"), "echo", json!([i])))
            .collect::<Vec<_>>()
    );
    let cases: Vec<(Value, String, &str)> = vec![
        // Nesting too deep: flat, nested, and with `u` after the value.
        (
            json!("deep-flat"),
            format!(r#"{{"role":"rpc","mpreg":1,"u":"deep-flat","cmds":[{echo_deep}]}}"#),
            "not valid JSON",
        ),
        (
            json!("deep-nested"),
            format!(r#"{{"role":"rpc","rpc":{{"cmds":[{echo_deep}],"u":"deep-nested"}}}}"#),
            "not valid JSON",
        ),
        (
            json!(77),
            format!(r#"{{"role":"rpc","mpreg":1,"cmds":[{echo_deep}],"u":77}}"#),
            "not valid JSON",
        ),
        // Wrong field types, cut-off JSON.
        (
            json!("types"),
            r#"{"role":"rpc","rpc":{"u":"types","cmds":[{"name":1,"fun":"echo"}]}}"#.into(),
            "command #0",
        ),
        (
            json!("cut"),
            r#"{"role":"rpc","mpreg":1,"u":"cut","cmds":[{"name":"e","fun""#.into(),
            "not valid JSON",
        ),
        // Too many commands (the node's limit here is 4).
        (
            json!("many"),
            flat("many", many.clone()).to_string(),
            "limit is 4",
        ),
        (
            json!("many-nested"),
            common::nested("many-nested", many).to_string(),
            "limit is 4",
        ),
    ];
    for (u, frame, mentions) in cases {
        ws.send_text(&frame).await;
        let reply = guard("refusal", ws.recv_json()).await;
        let error = err_of(&reply, &u, "bad_request");
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains(mentions)),
            "{u}: message should mention `{mentions}`: {error}"
        );
    }
    // The connection still serves.
    let reply = ws
        .request(&flat("ok", json!([cmd("e", "echo", json!([1]))])))
        .await;
    assert_eq!(ok_r(&reply, &json!("ok")), json!({"e": 1}));
}

#[tokio::test]
async fn request_ids_have_a_length_limit() {
    let node = start_default().await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    let cmds = || json!([cmd("e", "echo", json!(["x"]))]);
    // 256 bytes of JSON (quotes included) is the most.
    let longest = "a".repeat(mpreg::MAX_ID_BYTES - 2);
    let reply = ws.request(&flat(longest.clone(), cmds())).await;
    assert_eq!(ok_r(&reply, &json!(longest)), json!({"e": "x"}));
    // One more is refused, and the refusal carries the id (once) so the
    // client can match it.
    let long = "b".repeat(mpreg::MAX_ID_BYTES - 1);
    for request in [
        flat(long.clone(), cmds()),
        common::nested(long.clone(), cmds()),
    ] {
        ws.send_json(&request).await;
        let frame = ws.next_frame().await;
        let Some(Ok(Message::Text(text))) = frame else {
            panic!("expected a reply, got {frame:?}")
        };
        assert_eq!(text.as_str().matches(&long).count(), 1, "{text}");
        let reply: Value = serde_json::from_str(text.as_str()).expect("JSON reply");
        let error = err_of(&reply, &json!(long), "bad_request");
        assert!(
            error["message"].as_str().is_some_and(|m| m.contains("256")),
            "the message names the limit: {error}"
        );
        assert_eq!(error["details"]["limit"], mpreg::MAX_ID_BYTES);
    }
    // A streaming request with a long id gets no progress, only the refusal.
    let mut streaming = flat(long.clone(), cmds());
    streaming["stream"] = json!(true);
    let reply = ws.request(&streaming).await;
    err_of(&reply, &json!(long), "bad_request");
    let reply = ws.request(&flat("after", cmds())).await;
    assert_eq!(ok_r(&reply, &json!("after")), json!({"e": "x"}));
}
