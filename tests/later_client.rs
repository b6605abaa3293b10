//! Replies to the original Python project's later client, on the wire.
//!
//! That client sends the flat envelope without mpreg's marker (`"mpreg": 1`)
//! and reads every reply with a model that wants an integer `error.code`,
//! and the fields `intermediate_results` and `execution_summary`; its
//! `return_intermediate_results` means level by level. mpreg's clients (the
//! marker) and the first-release envelope keep mpreg's form. Every reply
//! here is compared with the shapes docs/PROTOCOL.md gives for each form
//! (for the later form, the original server's shapes).

mod common;

use std::collections::BTreeSet;

use common::{Hold, RawWs, builder, cmd, flat, guard, later, nested, start_node, url};
use mpreg::{Args, Command, ErrorCode, Function, Request, RpcError};
use serde_json::{Map, Value, json};

/// mpreg's codes and the original's numbers for them (docs/PROTOCOL.md,
/// "The later client's form").
const NUMBERS: [(&str, u64); 13] = [
    ("bad_request", 1004),
    ("duplicate_name", 1004),
    ("cycle", 1003),
    ("unknown_function", 1001),
    ("no_node_for_datasets", 1001),
    ("bad_arguments", 1003),
    ("handler_failed", 1003),
    ("timeout", 1004),
    ("node_lost", 1003),
    ("overloaded", 429),
    ("too_large", 1003),
    ("unauthorized", 403),
    ("internal", 1002),
];

fn number_of(kind: &str) -> u64 {
    NUMBERS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, n)| *n)
        .unwrap_or_else(|| panic!("no number for {kind}"))
}

/// How a request is sent.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Form {
    /// The first-release envelope (`{"role":"rpc","rpc":{..}}`).
    FirstRelease,
    /// The flat envelope with mpreg's marker.
    Marked,
    /// The flat envelope without it: the later client.
    Later,
}

const FORMS: [Form; 3] = [Form::FirstRelease, Form::Marked, Form::Later];

impl Form {
    fn request(self, u: &str, cmds: Value) -> Value {
        match self {
            Form::FirstRelease => nested(u, cmds),
            Form::Marked => flat(u, cmds),
            Form::Later => later(u, cmds),
        }
    }

    /// `request` with `options` beside `cmds`.
    fn with(self, u: &str, cmds: Value, options: Value) -> Value {
        let mut request = self.request(u, cmds);
        let body = match self {
            Form::FirstRelease => &mut request["rpc"],
            Form::Marked | Form::Later => &mut request,
        };
        for (k, v) in options.as_object().expect("options object") {
            body[k] = v.clone();
        }
        request
    }

    /// Whether replies take the later client's form.
    fn later(self) -> bool {
        self == Form::Later
    }
}

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect()
}

/// Checks the reply's envelope for `form` (exactly the documented fields)
/// and its id.
fn check_envelope(form: Form, reply: &Value, u: &Value) {
    assert_eq!(&reply["u"], u, "reply id in {reply}");
    assert_eq!(reply["role"], "rpc-response", "{reply}");
    let want: BTreeSet<&str> = if form.later() {
        [
            "role",
            "u",
            "r",
            "error",
            "intermediate_results",
            "execution_summary",
        ]
        .into()
    } else {
        ["role", "u", "r", "error"].into()
    };
    assert_eq!(keys(reply), want, "fields of {reply}");
}

/// Checks an error reply in `form` for request `u`, of mpreg's code `kind`;
/// returns the error object.
fn check_error(form: Form, reply: &Value, u: &Value, kind: &str) -> Value {
    check_envelope(form, reply, u);
    assert_eq!(reply["r"], Value::Null, "{reply}");
    let error = &reply["error"];
    assert_eq!(error["kind"], kind, "kind in {reply}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "a message in {reply}"
    );
    let fields = keys(error);
    let allowed: BTreeSet<&str> = ["code", "kind", "message", "command", "details"].into();
    assert!(fields.is_subset(&allowed), "error fields in {reply}");
    if form.later() {
        // The original server's shape: an integer code, always `details`,
        // and the fields its model defaults.
        assert_eq!(error["code"], number_of(kind), "code in {reply}");
        assert!(error["code"].is_u64(), "an integer code in {reply}");
        assert!(fields.contains("details"), "details in {reply}");
        assert_eq!(reply["intermediate_results"], json!([]), "{reply}");
        assert_eq!(reply["execution_summary"], Value::Null, "{reply}");
    } else {
        assert_eq!(error["code"], kind, "code in {reply}");
    }
    // The Rust client reads either form.
    let read: RpcError = serde_json::from_value(error.clone()).expect("an RpcError");
    assert_eq!(read.code.as_str(), kind, "{reply}");
    error.clone()
}

/// Checks a success reply in `form` for request `u`; returns `r`.
fn check_ok(form: Form, reply: &Value, u: &Value) -> Value {
    check_envelope(form, reply, u);
    assert_eq!(reply["error"], Value::Null, "{reply}");
    assert!(reply["r"].is_object(), "{reply}");
    reply["r"].clone()
}

/// A test node (see [`builder`]) from a config `set` changes.
fn with_config(set: impl FnOnce(&mut mpreg::Config)) -> mpreg::NodeBuilder {
    let mut config = mpreg::Config::default();
    set(&mut config);
    builder()
        .config(config)
        .listen("127.0.0.1:0")
        .without_linked_functions()
        .diagnostics(true)
}

/// `raise(code)` fails with an error of mpreg's code `code`.
fn raise() -> Function {
    Function::new("raise", |args: Args| async move {
        let code = args.positional().first().cloned().unwrap_or_default();
        let code: ErrorCode = serde_json::from_value(code.clone())
            .map_err(|e| RpcError::bad_arguments(format!("{code}: {e}")))?;
        Err::<Value, _>(RpcError::new(code, format!("raised {code}")))
    })
}

#[tokio::test]
async fn every_code_reaches_every_form() {
    let node = start_node(builder().function(raise())).await;
    let mut ws = RawWs::connect(&url(&node)).await;
    for (kind, _) in NUMBERS {
        for form in FORMS {
            let u = format!("{kind}-{form:?}");
            let reply = ws
                .request(&form.request(&u, json!([cmd("x", "raise", json!([kind]))])))
                .await;
            let error = check_error(form, &reply, &json!(u), kind);
            assert_eq!(error["command"], "x", "{reply}");
        }
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_failures_in_every_form() {
    let node = start_node(builder().datasets(["d"])).await;
    let cases: Vec<(&str, Value, Value)> = vec![
        (
            "unknown_function",
            json!([
                cmd("a", "echo", json!([1])),
                cmd("x", "no_such_fun", json!(["a"]))
            ]),
            json!({}),
        ),
        (
            "no_node_for_datasets",
            json!([{"name": "w", "fun": "mpreg.whoami", "locs": ["d", "nope"]}]),
            json!({}),
        ),
        (
            "duplicate_name",
            json!([cmd("a", "echo", json!([1])), cmd("a", "echo", json!([2]))]),
            json!({}),
        ),
        (
            "cycle",
            json!([
                cmd("a", "echo", json!(["b"])),
                cmd("b", "echo", json!(["a"]))
            ]),
            json!({}),
        ),
        (
            "bad_arguments",
            json!([cmd("e", "echo", json!([1, 2]))]),
            json!({}),
        ),
        (
            "handler_failed",
            json!([cmd("f", "debug.fail", json!(["on purpose"]))]),
            json!({}),
        ),
        (
            "timeout",
            json!([cmd("s", "debug.sleep", json!([60_000]))]),
            json!({"timeout_ms": 50}),
        ),
        ("bad_request", json!([]), json!({})),
        (
            "bad_request",
            json!([cmd("e", "echo", json!([1]))]),
            json!({"timeout_ms": "soon"}),
        ),
        (
            "bad_request",
            json!([cmd("e", "echo", json!([1]))]),
            json!({"include_execution_summary": "yes"}),
        ),
    ];
    let mut ws = RawWs::connect(&url(&node)).await;
    for (i, (kind, cmds, options)) in cases.into_iter().enumerate() {
        for form in FORMS {
            let u = format!("{i}-{kind}-{form:?}");
            let reply = ws
                .request(&form.with(&u, cmds.clone(), options.clone()))
                .await;
            check_error(form, &reply, &json!(u), kind);
        }
    }
    // The cycle's details are the same object in either form.
    for form in FORMS {
        let cycle = json!([
            cmd("a", "echo", json!(["b"])),
            cmd("b", "echo", json!(["a"]))
        ]);
        let reply = ws.request(&form.request("cyc", cycle)).await;
        let error = check_error(form, &reply, &json!("cyc"), "cycle");
        let names = error["details"]["cycle"].as_array().map(Vec::len);
        assert_eq!(names, Some(2), "{reply}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn refused_frames_keep_the_form_of_their_envelope() {
    let node = start_node(builder()).await;
    let mut ws = RawWs::connect(&url(&node)).await;
    // Cut short after the id (and after the marker, when there is one).
    let cut = [
        (
            Form::FirstRelease,
            r#"{"role":"rpc","rpc":{"u":"cut","cmds":["#,
        ),
        (
            Form::Marked,
            r#"{"role":"rpc","mpreg":1,"u":"cut","cmds":["#,
        ),
        (Form::Later, r#"{"role":"rpc","u":"cut","cmds":["#),
    ];
    for (form, frame) in cut {
        ws.send_text(frame).await;
        let reply = ws.recv_json().await;
        check_error(form, &reply, &json!("cut"), "bad_request");
    }
    // A marker that is not a positive integer: refused in mpreg's form.
    let reply = ws
        .request(&json!({"role": "rpc", "mpreg": "yes", "u": "m", "cmds": []}))
        .await;
    let error = check_error(Form::Marked, &reply, &json!("m"), "bad_request");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("`mpreg`"))
    );
    // No readable id: the reply matches no request, in mpreg's form.
    for frame in [
        r#"{"role":"rpc","cmds":["#,
        r#"{"role":"rpc","u":null,"cmds":[]}"#,
        "[1, 2]",
    ] {
        ws.send_text(frame).await;
        let reply = ws.recv_json().await;
        check_error(Form::Marked, &reply, &Value::Null, "bad_request");
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_and_too_large_in_every_form() {
    let hold = Hold::default();
    let node = start_node(
        with_config(|c| c.max_reply_bytes = Some(1000))
            .function(hold.function())
            .max_inflight_per_connection(1),
    )
    .await;
    for form in FORMS {
        let mut ws = RawWs::connect(&url(&node)).await;
        ws.send_json(&form.request("held", json!([cmd("h", "hold", json!([]))])))
            .await;
        guard("hold starts", hold.started.notified()).await;
        let reply = ws
            .request(&form.request("over", json!([cmd("e", "echo", json!([1]))])))
            .await;
        check_error(form, &reply, &json!("over"), "overloaded");
        hold.release.notify_one();
        let reply = ws.recv_json().await;
        assert_eq!(
            check_ok(form, &reply, &json!("held")),
            json!({"h": "released"})
        );

        let big = json!([cmd("e", "echo", json!(["x".repeat(2000)]))]);
        let reply = ws.request(&form.request("big", big)).await;
        let error = check_error(form, &reply, &json!("big"), "too_large");
        assert_eq!(error["details"]["limit"], 1000, "{reply}");
        ws.close().await;
    }
    node.shutdown().await;
}

#[tokio::test]
async fn unauthorized_in_every_form() {
    let node = start_node(builder().client_tokens(["tok"])).await;
    for form in FORMS {
        let mut ws = RawWs::connect(&url(&node)).await;
        let reply = ws
            .request(&form.request("no-token", json!([cmd("e", "echo", json!([1]))])))
            .await;
        check_error(form, &reply, &json!("no-token"), "unauthorized");
        assert_eq!(ws.expect_closed().await, Some(1008));
    }
    node.shutdown().await;
}

/// The five reference examples' last one: four levels.
fn example_5() -> Value {
    json!([
        cmd("|first", "echo", json!(["hi there!"])),
        cmd("|second", "echo", json!(["|first"])),
        cmd(
            "|third",
            "echos",
            json!(["|first", "|second", "AND ME TOO"])
        ),
        cmd("|4th", "echo", json!(["|third"])),
    ])
}

/// Checks the fields and types of one `intermediate_results` entry.
fn check_entry(entry: &Value, u: &str, k: usize, total: usize) {
    let want: BTreeSet<&str> = [
        "request_id",
        "level_index",
        "level_results",
        "accumulated_results",
        "total_levels",
        "completed_levels",
        "timestamp",
        "execution_time_ms",
    ]
    .into();
    assert_eq!(keys(entry), want, "{entry}");
    assert_eq!(entry["request_id"], u);
    assert_eq!(entry["level_index"], k);
    assert_eq!(entry["total_levels"], total);
    assert_eq!(entry["completed_levels"], k + 1);
    assert!(entry["level_results"].is_object() && entry["accumulated_results"].is_object());
    assert!(
        entry["timestamp"].as_f64().is_some_and(|t| t > 1.0e9),
        "{entry}"
    );
    assert!(
        entry["execution_time_ms"]
            .as_f64()
            .is_some_and(|t| t >= 0.0),
        "{entry}"
    );
}

#[tokio::test]
async fn intermediate_results_come_level_by_level_to_the_later_client() {
    let node = start_node(builder()).await;
    let mut ws = RawWs::connect(&url(&node)).await;
    let hi = json!("hi there!");
    let third = json!(["hi there!", "hi there!", "AND ME TOO"]);
    let intermediate = json!({"return_intermediate_results": true});

    let reply = ws
        .request(&Form::Later.with("lv", example_5(), intermediate.clone()))
        .await;
    // `r` is the last level; one entry per level, each with what the levels
    // so far produced.
    assert_eq!(
        check_ok(Form::Later, &reply, &json!("lv")),
        json!({"|4th": third})
    );
    assert_eq!(reply["execution_summary"], Value::Null);
    let levels = reply["intermediate_results"].as_array().expect("a list");
    assert_eq!(levels.len(), 4, "{reply}");
    let mut so_far = Map::new();
    let each = [
        ("|first", hi.clone()),
        ("|second", hi.clone()),
        ("|third", third.clone()),
        ("|4th", third.clone()),
    ];
    let mut stamps = Vec::new();
    for (k, (entry, (name, value))) in levels.iter().zip(each).enumerate() {
        check_entry(entry, "lv", k, 4);
        assert_eq!(entry["level_results"], json!({ name: value }), "level {k}");
        so_far.insert(name.into(), value);
        assert_eq!(entry["accumulated_results"], Value::Object(so_far.clone()));
        stamps.push(entry["timestamp"].as_f64().expect("a number"));
    }
    assert!(stamps.is_sorted(), "levels end in order: {stamps:?}");

    // An independent command is on level 0: not in the later client's `r`.
    let independent = json!([
        cmd("a", "echo", json!([1])),
        cmd("b", "echo", json!([2])),
        cmd("c", "echo", json!(["a"])),
    ]);
    let reply = ws
        .request(&Form::Later.with("ind", independent.clone(), intermediate.clone()))
        .await;
    assert_eq!(
        check_ok(Form::Later, &reply, &json!("ind")),
        json!({"c": 1})
    );
    let levels = &reply["intermediate_results"];
    assert_eq!(levels[0]["level_results"], json!({"a": 1, "b": 2}));
    assert_eq!(levels[1]["level_results"], json!({"c": 1}));
    assert_eq!(
        levels[1]["accumulated_results"],
        json!({"a": 1, "b": 2, "c": 1})
    );

    // One command: one level.
    let reply = ws
        .request(&Form::Later.with(
            "one",
            json!([cmd("e", "echo", json!([5]))]),
            intermediate.clone(),
        ))
        .await;
    assert_eq!(
        check_ok(Form::Later, &reply, &json!("one")),
        json!({"e": 5})
    );
    check_entry(&reply["intermediate_results"][0], "one", 0, 1);

    // Without it, the later client gets every sink (mpreg's rule) and no
    // entries.
    let reply = ws
        .request(&Form::Later.request("plain", independent.clone()))
        .await;
    assert_eq!(
        check_ok(Form::Later, &reply, &json!("plain")),
        json!({"b": 2, "c": 1})
    );
    assert_eq!(reply["intermediate_results"], json!([]));

    // mpreg's clients and the first release keep mpreg's meaning: every
    // command's result in `r`, nothing else.
    for form in [Form::Marked, Form::FirstRelease] {
        let reply = ws
            .request(&form.with("all", independent.clone(), intermediate.clone()))
            .await;
        assert_eq!(
            check_ok(form, &reply, &json!("all")),
            json!({"a": 1, "b": 2, "c": 1}),
            "{form:?}"
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn the_execution_summary_alone_or_with_levels() {
    let node = start_node(builder()).await;
    let mut ws = RawWs::connect(&url(&node)).await;
    let summary_fields: BTreeSet<&str> = [
        "request_id",
        "total_execution_time_ms",
        "total_levels",
        "level_execution_times",
        "bottleneck_level_index",
        "average_level_time_ms",
        "parallel_commands_executed",
        "cross_cluster_hops",
    ]
    .into();
    for (u, options, entries) in [
        ("s", json!({"include_execution_summary": true}), 0),
        (
            "sl",
            json!({"include_execution_summary": true, "return_intermediate_results": true}),
            4,
        ),
    ] {
        let reply = ws.request(&Form::Later.with(u, example_5(), options)).await;
        check_ok(Form::Later, &reply, &json!(u));
        assert_eq!(
            reply["intermediate_results"].as_array().map(Vec::len),
            Some(entries)
        );
        let summary = &reply["execution_summary"];
        assert_eq!(keys(summary), summary_fields, "{summary}");
        assert_eq!(summary["request_id"], u);
        assert_eq!(summary["total_levels"], 4);
        assert_eq!(summary["parallel_commands_executed"], 4);
        assert_eq!(summary["cross_cluster_hops"], 0);
        let times: Vec<f64> = summary["level_execution_times"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|t| t.as_f64().expect("a number"))
            .collect();
        assert_eq!(times.len(), 4);
        assert!(times.iter().all(|&t| t >= 0.0), "{times:?}");
        let bottleneck = summary["bottleneck_level_index"]
            .as_u64()
            .expect("an index");
        let slowest = times.iter().copied().fold(f64::MIN, f64::max);
        assert_eq!(times[bottleneck as usize], slowest, "{summary}");
        let total = summary["total_execution_time_ms"]
            .as_f64()
            .expect("a number");
        // The levels' times add up to the time to the last result.
        assert!(times.iter().sum::<f64>() <= total + 1e-6, "{summary}");
        let average = summary["average_level_time_ms"].as_f64().expect("a number");
        assert!((average - times.iter().sum::<f64>() / 4.0).abs() < 1e-9);
    }
    // mpreg's forms never carry a summary.
    for form in [Form::Marked, Form::FirstRelease] {
        let reply = ws
            .request(&form.with("m", example_5(), json!({"include_execution_summary": true})))
            .await;
        check_ok(form, &reply, &json!("m"));
    }
    node.shutdown().await;
}

/// A chain of `n` commands, each echoing a string of `len` characters
/// (the first a literal, the others the previous command's result).
fn chain(n: usize, len: usize) -> Value {
    let mut cmds = vec![cmd("c0", "echo", json!(["x".repeat(len)]))];
    for i in 1..n {
        cmds.push(cmd(
            &format!("c{i}"),
            "echo",
            json!([format!("c{}", i - 1)]),
        ));
    }
    Value::Array(cmds)
}

#[tokio::test]
async fn results_count_once_against_the_reply_budget_however_often_written() {
    // Results of 1002 bytes (a string of 1000 and its quotes).
    let node = start_node(with_config(|c| c.max_reply_bytes = Some(4000))).await;
    let mut ws = RawWs::connect(&url(&node)).await;
    let levels = json!({"return_intermediate_results": true});
    // Three: 3006 bytes held, within the budget; the level-by-level reply
    // writes them ten times (three levels, six accumulated, and `r`).
    let reply = ws
        .request(&Form::Later.with("three", chain(3, 1000), levels.clone()))
        .await;
    check_ok(Form::Later, &reply, &json!("three"));
    assert_eq!(
        reply["intermediate_results"].as_array().map(Vec::len),
        Some(3)
    );
    let text = reply.to_string();
    assert!(text.len() > 10 * 1000, "{} bytes", text.len());
    // Four: 4008 bytes held, over the budget, whatever the form.
    for form in FORMS {
        let reply = ws
            .request(&form.with("four", chain(4, 1000), levels.clone()))
            .await;
        let error = check_error(form, &reply, &json!("four"), "too_large");
        assert_eq!(error["details"]["limit"], 4000, "{reply}");
        assert_eq!(error["command"], "c3", "{reply}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn a_level_report_must_fit_in_one_message() {
    // 8000-byte messages; five results of 1002 bytes are within the reply
    // budget (the message limit) but written 21 times level by level.
    let node = start_node(builder().max_message_size(8000)).await;
    let mut ws = RawWs::connect(&url(&node)).await;
    let levels = json!({"return_intermediate_results": true});
    let reply = ws
        .request(&Form::Later.with("five", chain(5, 1000), levels.clone()))
        .await;
    let error = check_error(Form::Later, &reply, &json!("five"), "too_large");
    assert_eq!(error["details"]["limit"], 8000, "{reply}");
    assert!(
        error["details"]["bytes"]
            .as_u64()
            .is_some_and(|b| b > 5 * 1002 * 4),
        "{reply}"
    );
    // mpreg's clients get every result once: it fits.
    let reply = ws
        .request(&Form::Marked.with("five", chain(5, 1000), levels))
        .await;
    let r = check_ok(Form::Marked, &reply, &json!("five"));
    assert_eq!(r.as_object().map(Map::len), Some(5));
    // And so does the later client without levels.
    let reply = ws
        .request(&Form::Later.request("sinks", chain(5, 1000)))
        .await;
    assert_eq!(
        check_ok(Form::Later, &reply, &json!("sinks"))["c4"]
            .as_str()
            .map(str::len),
        Some(1000)
    );
    node.shutdown().await;
}

#[tokio::test]
async fn the_rust_client_is_answered_in_mpregs_form() {
    // It sends the marker: `return_intermediate_results` is every result,
    // not the last level.
    let node = start_node(builder()).await;
    let client = common::client(&node).await;
    let results = guard(
        "send",
        client.send(
            Request::new()
                .cmd(Command::new("a", "echo").arg(1))
                .cmd(Command::new("b", "echo").arg(2))
                .cmd(Command::new("c", "echo").arg("a"))
                .return_intermediate_results(true),
        ),
    )
    .await
    .expect("runs");
    assert_eq!(
        Value::Object(results.into_map()),
        json!({"a": 1, "b": 2, "c": 1})
    );
    let e = common::rpc_error(
        guard("call", client.call::<Value>("no_such_fun", ())).await,
        ErrorCode::UnknownFunction,
    );
    assert!(e.message.contains("no_such_fun"), "{e}");
    node.shutdown().await;
}
