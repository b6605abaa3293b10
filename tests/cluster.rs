//! Several nodes in one process, joined over loopback: routing by function
//! and datasets, forwarding through a balancer, chains shipped as one job,
//! leaves, and what happens when a node goes away.

mod common;

use std::time::Duration;

use common::{RawWs, guard, url};
use mpreg::{Client, Command, ErrorCode, Function, NodeHandle, Request};
use mpreg::{ClusterView, NodeStatus};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(30);

/// A node for cluster tests: loopback, port 0, no linked functions.
fn node(name: &str) -> mpreg::NodeBuilder {
    common::member(name).diagnostics(true)
}

/// A node for cluster tests that joins through `seed`.
fn joining(name: &str, seed: &NodeHandle) -> mpreg::NodeBuilder {
    node(name).peers([url(seed)])
}

/// Waits until `entry` has a call in flight on some peer; returns its name.
async fn busy_peer(entry: &NodeHandle) -> String {
    let mut busy = None;
    let found = entry
        .wait_for(CONVERGE, |view| {
            busy = view
                .nodes
                .iter()
                .find(|n| n.status != NodeStatus::This && n.load == 1)
                .map(|n| n.name.clone());
            busy.is_some()
        })
        .await;
    assert!(found, "no call in flight on any peer of {}", entry.name());
    busy.unwrap_or_default()
}

/// Waits until `node` sees exactly the named nodes.
async fn converge(node: &NodeHandle, names: &[&str]) {
    let mut want: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    let ok = node
        .wait_for(CONVERGE, |view| view.node_names() == want)
        .await;
    assert!(
        ok,
        "{} sees {:?}, wanted {want:?}",
        node.name(),
        node.cluster_view().node_names()
    );
}

async fn whoami(client: &Client, locs: &[&str]) -> Result<String, mpreg::Error> {
    client
        .call_command(Command::new("w", "mpreg.whoami").datasets(locs.iter().copied()))
        .await
}

/// A (balancer), B (model-a, model-b) and C (model-c), B and C joined
/// through A.
async fn three() -> (NodeHandle, NodeHandle, NodeHandle) {
    let a = node("A").start().await.expect("start A");
    let b = joining("B", &a)
        .datasets(["model-a", "model-b"])
        .start()
        .await
        .expect("start B");
    let c = joining("C", &a)
        .datasets(["model-c"])
        .start()
        .await
        .expect("start C");
    converge(&a, &["A", "B", "C"]).await;
    (a, b, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancer_routes_by_datasets() {
    let (a, b, c) = three().await;
    let client = guard("connect", Client::connect(&url(&a)))
        .await
        .expect("connect");

    assert_eq!(
        guard("a", whoami(&client, &["model-a"]))
            .await
            .expect("B runs it"),
        "B"
    );
    assert_eq!(
        guard("ab", whoami(&client, &["model-a", "model-b"]))
            .await
            .expect("B"),
        "B"
    );
    assert_eq!(
        guard("c", whoami(&client, &["model-c"]))
            .await
            .expect("C runs it"),
        "C"
    );

    let e = common::rpc_error(
        guard("ac", whoami(&client, &["model-a", "model-c"])).await,
        ErrorCode::NoNodeForDatasets,
    );
    assert_eq!(e.code, ErrorCode::NoNodeForDatasets);
    assert_eq!(e.command.as_deref(), Some("w"));

    let e = guard("unknown", client.call::<Value>("no.such.fun", ()))
        .await
        .expect_err("unknown");
    assert!(
        matches!(e, mpreg::Error::Rpc(ref e) if e.code == ErrorCode::UnknownFunction),
        "{e:?}"
    );

    // Node-local functions are not offered to peers.
    let view = a.cluster_view();
    let peer_b = view.node("B").expect("A sees B");
    assert!(
        peer_b.offers("mpreg.whoami", &[]) && !peer_b.offers("mpreg.cluster", &[]),
        "{:?}",
        peer_b.functions
    );

    // The five reference examples through the balancer.
    for example in mpreg::demo::reference_examples() {
        let results = guard("example", client.send(example.request))
            .await
            .expect("runs");
        assert_eq!(Value::Object(results.into_map()), example.expected);
    }

    for n in [c, b, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_request_runs_on_several_nodes_and_returns_through_the_balancer() {
    let (a, b, c) = three().await;
    let client = guard("connect", Client::connect(&url(&a)))
        .await
        .expect("connect");
    let request = Request::new()
        .cmd(Command::new("on_b", "mpreg.whoami").dataset("model-a"))
        .cmd(Command::new("on_c", "mpreg.whoami").dataset("model-c"))
        .cmd(
            Command::new("both", "echos")
                .arg("on_b")
                .arg("on_c")
                .dataset("model-b"),
        )
        .cmd(Command::new("tail", "echo").arg("both").dataset("model-c"));
    let results = guard(
        "mixed",
        client.send(request.return_intermediate_results(true)),
    )
    .await
    .expect("runs");
    assert_eq!(results.get::<String>("on_b").expect("on_b"), "B");
    assert_eq!(results.get::<String>("on_c").expect("on_c"), "C");
    assert_eq!(results.value("tail"), Some(&json!(["B", "C"])));
    for n in [c, b, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_on_a_remote_node_is_one_job() {
    let a = node("A").start().await.expect("start A");
    let upper = Function::new("upper", |args: mpreg::Args| async move {
        let s = args
            .positional()
            .first()
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_uppercase();
        Ok(Value::String(s))
    });
    let b = joining("B", &a)
        .function(upper)
        .start()
        .await
        .expect("start B");
    converge(&a, &["A", "B"]).await;
    let jobs_to_b =
        |view: &ClusterView| -> u64 { view.node("B").and_then(|n| n.jobs_sent).unwrap_or(0) };
    let before = jobs_to_b(&a.cluster_view());

    let mut request = Request::new().cmd(Command::new("s0", "upper").arg("abc"));
    for i in 1..8 {
        request = request.cmd(Command::new(format!("s{i}"), "upper").arg(format!("s{}", i - 1)));
    }
    let client = guard("connect", Client::connect(&url(&a)))
        .await
        .expect("connect");
    let results = guard("chain", client.send(request)).await.expect("runs");
    assert_eq!(results.get::<String>("s7").expect("s7"), "ABC");
    // Eight commands, one message to B.
    assert_eq!(jobs_to_b(&a.cluster_view()) - before, 1);

    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_panicking_on_a_peer_is_handler_failed_and_the_link_stays() {
    let a = node("A").start().await.expect("start A");
    // Panics at its second poll: the job is not done when it arrives, so
    // it goes on on a task (`debug.panic` panics at the first poll).
    let later = Function::new("panic_later", |_: mpreg::Args| async move {
        tokio::task::yield_now().await;
        panic!("panic_later was called")
    });
    let b = joining("B", &a)
        .datasets(["b"])
        .function(later)
        .start()
        .await
        .expect("start B");
    converge(&a, &["A", "B"]).await;
    let client = guard("connect", Client::connect(&url(&a)))
        .await
        .expect("connect");
    for fun in ["debug.panic", "panic_later"] {
        let command = Command::new("p", fun).datasets(["b"]);
        let e = match guard(fun, client.call_command::<Value>(command)).await {
            Err(mpreg::Error::Rpc(e)) => e,
            other => panic!("{fun}: expected an error reply, got {other:?}"),
        };
        assert_eq!(e.code, ErrorCode::HandlerFailed, "{fun}: {e:?}");
        assert_eq!(e.command.as_deref(), Some("p"));
        assert!(e.message.contains("panicked"), "{fun}: {}", e.message);
    }
    // The link is still up: B still answers through A.
    let who = guard("whoami", whoami(&client, &["b"])).await;
    assert_eq!(who.expect("B answers"), "B");

    b.shutdown().await;
    a.shutdown().await;
}

/// A function that sleeps `ms` and returns the name of the node it ran on.
fn slow(node_name: &str, idempotent: bool) -> Function {
    let name = node_name.to_owned();
    let f = Function::new("slow", move |args: mpreg::Args| {
        let name = name.clone();
        async move {
            let ms = args
                .positional()
                .first()
                .and_then(Value::as_u64)
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Value::String(name))
        }
    })
    .datasets(["model-a"]);
    if idempotent { f.idempotent() } else { f }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_out_only_node_is_served_through_its_gateway() {
    let a = node("A").start().await.expect("start A");
    let b = joining("B", &a).start().await.expect("start B");
    let leaf_fn = Function::new("leaf.hello", |_args: mpreg::Args| async {
        Ok(Value::String("hello from the leaf".into()))
    });
    let leaf = node("L")
        .dial_out_only()
        .function(leaf_fn)
        .peers([url(&a)])
        .start()
        .await
        .expect("start leaf");
    assert_eq!(leaf.url(), None, "a dial-out-only node does not listen");
    converge(&a, &["A", "B", "L"]).await;
    let offers_leaf_fn = |view: &ClusterView| view.offers("leaf.hello", &[]);
    assert!(
        b.wait_for(CONVERGE, offers_leaf_fn).await,
        "B learns the leaf's function from A"
    );

    // Through the gateway, and through another member (B → A → L).
    for entry in [&a, &b] {
        let client = guard("connect", Client::connect(&url(entry)))
            .await
            .expect("connect");
        let said: String = guard("leaf call", client.call("leaf.hello", ()))
            .await
            .expect("runs on L");
        assert_eq!(said, "hello from the leaf");
        let who: String = guard(
            "leaf whoami",
            client.call_command(
                Command::new("w", "mpreg.whoami")
                    .dataset("no-such")
                    .kwarg("x", 1),
            ),
        )
        .await
        .map_err(|e| e.to_string())
        .unwrap_or_else(|e| e);
        assert!(who.contains("no_node_for_datasets"), "{who}");
    }

    // The leaf goes away: its function disappears from the gateway's catalog.
    leaf.shutdown().await;
    assert!(a.wait_for(CONVERGE, |v| !offers_leaf_fn(v)).await);
    assert!(b.wait_for(CONVERGE, |v| !offers_leaf_fn(v)).await);
    for n in [b, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_fails_its_calls_with_node_lost_and_leaves_the_routes() {
    let a = node("A").start().await.expect("start A");
    let b = joining("B", &a)
        .function(slow("B", false))
        .start()
        .await
        .expect("start B");
    converge(&a, &["A", "B"]).await;
    let client = guard("connect", Client::connect(&url(&a)))
        .await
        .expect("connect");
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call_command::<String>(Command::new("s", "slow").arg(60_000).dataset("model-a"))
                .await
        }
    });
    // Wait until the call is running on B, then crash B.
    assert!(
        a.wait_for(CONVERGE, |v| v.node("B").is_some_and(|b| b.load == 1))
            .await
    );
    b.kill().await;
    let e = common::rpc_error(
        guard("call on a killed node", call).await.expect("join"),
        ErrorCode::NodeLost,
    );
    assert_eq!(e.code, ErrorCode::NodeLost);
    assert_eq!(e.command.as_deref(), Some("s"));
    converge(&a, &["A"]).await;
    let e = guard(
        "after",
        client.call_command::<String>(Command::new("s", "slow").arg(0).dataset("model-a")),
    )
    .await
    .expect_err("no node has it now");
    assert!(
        matches!(e, mpreg::Error::Rpc(ref e) if e.code == ErrorCode::UnknownFunction),
        "{e:?}"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_call_is_retried_on_another_node() {
    let a = node("A").start().await.expect("start A");
    let b1 = joining("B1", &a)
        .function(slow("B1", true))
        .start()
        .await
        .expect("B1");
    let b2 = joining("B2", &a)
        .function(slow("B2", true))
        .start()
        .await
        .expect("B2");
    converge(&a, &["A", "B1", "B2"]).await;
    let client = guard("connect", Client::connect(&url(&a)))
        .await
        .expect("connect");
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call_command::<String>(Command::new("s", "slow").arg(1500).dataset("model-a"))
                .await
        }
    });
    let first = busy_peer(&a).await;
    let (victim, survivor) = if first == "B1" { (b1, b2) } else { (b2, b1) };
    victim.kill().await;
    let ran_on = guard("retried call", call)
        .await
        .expect("join")
        .expect("retried");
    assert_eq!(
        ran_on,
        survivor.name(),
        "the call was retried on the other node"
    );
    survivor.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_becomes_routable_and_seeds_may_come_later() {
    // B is told about A before A exists: it keeps trying.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").expect("reserve a port");
    let a_addr = reserved.local_addr().expect("addr");
    drop(reserved);
    let b = node("B")
        .datasets(["model-b"])
        .peers([format!("ws://{a_addr}")])
        .start()
        .await
        .expect("start B");
    let a = node("A")
        .listen(a_addr.to_string())
        .start()
        .await
        .expect("start A later");
    converge(&a, &["A", "B"]).await;
    let client = guard("connect", Client::connect(&url(&a)))
        .await
        .expect("connect");
    assert_eq!(
        guard("b", whoami(&client, &["model-b"])).await.expect("B"),
        "B"
    );

    // C joins last, and is routable from A at once.
    let c = joining("C", &a)
        .datasets(["model-c"])
        .start()
        .await
        .expect("C");
    converge(&a, &["A", "B", "C"]).await;
    assert_eq!(
        guard("c", whoami(&client, &["model-c"])).await.expect("C"),
        "C"
    );
    for n in [c, b, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_learn_each_other_through_gossip() {
    let (a, b, c) = three().await;
    // B and C were only told about A.
    converge(&b, &["A", "B", "C"]).await;
    converge(&c, &["A", "B", "C"]).await;
    let client = guard("connect", Client::connect(&url(&b)))
        .await
        .expect("connect");
    assert_eq!(
        guard("c from b", whoami(&client, &["model-c"]))
            .await
            .expect("C"),
        "C"
    );
    // A graceful shutdown is seen by every member.
    c.shutdown().await;
    converge(&a, &["A", "B"]).await;
    converge(&b, &["A", "B"]).await;
    for n in [b, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_nodes_converge() {
    let started = std::time::Instant::now();
    let first = node("n00").datasets(["d00"]).start().await.expect("start");
    let seed = url(&first);
    let mut nodes = vec![first];
    for i in 1..16 {
        let n = node(&format!("n{i:02}"))
            .datasets([format!("d{i:02}")])
            .peers([seed.clone()])
            .start()
            .await
            .expect("start");
        nodes.push(n);
    }
    // Every node sees every node, and every ability: each dataset.
    let mut want: Vec<String> = (0..16).map(|i| format!("n{i:02}")).collect();
    want.sort();
    let complete = |view: &ClusterView| {
        view.node_names() == want
            && (0..16).all(|i| view.nodes_with_dataset(&format!("d{i:02}")) == 1)
    };
    for n in &nodes {
        assert!(
            n.wait_for(CONVERGE, complete).await,
            "{} sees {:?}",
            n.name(),
            n.cluster_view().node_names()
        );
    }
    println!("16 nodes converged in {:?}", started.elapsed());
    let client = guard("connect", Client::connect(&url(&nodes[7])))
        .await
        .expect("connect");
    assert_eq!(
        guard("d15", whoami(&client, &["d15"])).await.expect("n15"),
        "n15"
    );
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_is_routable_again() {
    let (a, b, c) = three().await;
    let b_addr = b.local_addr().expect("B listens");
    b.kill().await;
    converge(&a, &["A", "C"]).await;
    converge(&c, &["A", "C"]).await;
    let client = guard("connect", Client::connect(&url(&a)))
        .await
        .expect("connect");
    let e = guard("b gone", whoami(&client, &["model-a"]))
        .await
        .expect_err("B is gone");
    assert!(
        matches!(e, mpreg::Error::Rpc(ref e) if e.code == ErrorCode::NoNodeForDatasets),
        "{e:?}"
    );

    // Same address, new generation. Another process may hold one of the
    // address's ports for a moment (tests run in parallel and ports are
    // handed out by the OS): then start again, a bounded number of times.
    let mut restarted = None;
    for _ in 0..100 {
        let started = node("B")
            .listen(b_addr.to_string())
            .datasets(["model-a", "model-b"])
            .peers([url(&a)])
            .start()
            .await;
        match started {
            Ok(b) => {
                restarted = Some(b);
                break;
            }
            Err(mpreg::Error::Io(e)) if e.kind() == std::io::ErrorKind::AddrInUse => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("restart B: {e}"),
        }
    }
    let b = restarted.expect("B's address stayed in use");
    converge(&a, &["A", "B", "C"]).await;
    converge(&c, &["A", "B", "C"]).await;
    assert_eq!(
        guard("b back", whoami(&client, &["model-a"]))
            .await
            .expect("B"),
        "B"
    );
    for n in [c, b, a] {
        n.shutdown().await;
    }
}

/// The next `done` answer on a raw peer link (skipping catalog pushes).
async fn done(ws: &mut RawWs) -> Value {
    for _ in 0..100 {
        let message = ws.recv_json().await;
        if message["role"] == "done" {
            return message;
        }
    }
    panic!("no done message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_links_check_what_peers_send() {
    let a = node("A").start().await.expect("start A");
    let mut ws = RawWs::connect(&url(&a)).await;
    // Without a cluster secret: the opening, then the hello.
    ws.send_json(&json!({"role": "peer-open", "body": {"protocol": 3}}))
        .await;
    ws.send_json(&json!({"role": "peer-hello", "body": {
        "protocol": 3, "name": "fake", "addr": null, "generation": 1,
        "catalog": {"version": 1, "functions": []}
    }}))
    .await;
    let hello = ws.recv_json().await;
    assert_eq!(hello["role"], "peer-hello");
    assert_eq!(hello["body"]["name"], "A");

    // A job whose output names no step.
    let bad_output = json!({"role": "run", "body": {"id": 1, "timeout_ms": 5000, "outputs": [5],
        "steps": [{"name": "s", "fun": "echo", "args": [{"value": 1}]}]}});
    ws.send_json(&bad_output).await;
    let answer = done(&mut ws).await;
    assert_eq!(answer["body"]["id"], 1);
    assert_eq!(answer["body"]["error"]["code"], "bad_request");

    // A good two-step job: typed values are never read as references.
    let good = json!({"role": "run", "body": {"id": 2, "timeout_ms": 5000, "outputs": [1],
    "steps": [
        {"name": "s0", "fun": "echo", "args": [{"value": "s1"}]},
        {"name": "s1", "fun": "echos", "args": [{"ref": 0}, {"value": "s0"}]}
    ]}});
    ws.send_json(&good).await;
    let answer = done(&mut ws).await;
    assert_eq!(answer["body"]["id"], 2);
    assert_eq!(answer["body"]["values"], json!([["s1", "s0"]]));

    // A reference to a step that does not exist.
    let dangling = json!({"role": "run", "body": {"id": 3, "timeout_ms": 5000, "outputs": [0],
        "steps": [{"name": "s", "fun": "echo", "args": [{"ref": 9}]}]}});
    ws.send_json(&dangling).await;
    let answer = done(&mut ws).await;
    assert_eq!(answer["body"]["error"]["code"], "bad_request");

    // Garbage closes the link, and only the link.
    ws.send_text("this is not a peer message").await;
    ws.expect_closed().await;
    let client = guard("connect", Client::connect(&url(&a)))
        .await
        .expect("connect");
    let n: i64 = guard("still serving", client.call("echo", (5,)))
        .await
        .expect("echo");
    assert_eq!(n, 5);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abilities_changed_at_runtime_are_seen_by_all() {
    let (a, b, c) = three().await;
    converge(&c, &["A", "B", "C"]).await;
    let late = Function::new("late.fn", |_args: mpreg::Args| async {
        Ok(Value::String("late".into()))
    });
    b.register(late);
    let offers = |view: &ClusterView| view.offers("late.fn", &[]);
    assert!(a.wait_for(CONVERGE, offers).await, "A learns of late.fn");
    assert!(c.wait_for(CONVERGE, offers).await, "C learns of late.fn");
    let client = guard("connect", Client::connect(&url(&c)))
        .await
        .expect("connect");
    let said: String = guard("late call", client.call("late.fn", ()))
        .await
        .expect("runs on B");
    assert_eq!(said, "late");

    assert!(b.unregister("late.fn"));
    assert!(!b.unregister("late.fn"), "already gone");
    assert!(
        a.wait_for(CONVERGE, |v| !offers(v)).await,
        "A forgets late.fn"
    );
    assert!(
        c.wait_for(CONVERGE, |v| !offers(v)).await,
        "C forgets late.fn"
    );
    let e = guard("gone", client.call::<Value>("late.fn", ()))
        .await
        .expect_err("gone");
    assert!(
        matches!(e, mpreg::Error::Rpc(ref e) if e.code == ErrorCode::UnknownFunction),
        "{e:?}"
    );
    for n in [c, b, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_are_described_cluster_wide() {
    let a = node("A").start().await.expect("A");
    let double = Function::new("double", |args: mpreg::Args| async move {
        let x = args
            .positional()
            .first()
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        Ok(json!(x * 2.0))
    })
    .params(&[mpreg::Param::new("x", "f64")], "f64")
    .doc("Doubles x.")
    .datasets(["model-a"]);
    let b = joining("B", &a).function(double).start().await.expect("B");
    converge(&a, &["A", "B"]).await;
    let client = guard("connect", Client::connect(&url(&a)))
        .await
        .expect("connect");
    let functions: Vec<Value> = guard("describe", client.call("mpreg.functions", ()))
        .await
        .expect("described");
    let double = functions
        .iter()
        .find(|f| f["name"] == "double")
        .expect("A describes B's function");
    assert_eq!(double["params"], json!([{"name": "x", "type": "f64"}]));
    assert_eq!(double["returns"], "f64");
    assert_eq!(double["doc"], "Doubles x.");
    assert_eq!(
        double["nodes"],
        json!([{"node": "B", "datasets": ["model-a"]}])
    );
    // Built-ins are described too, on both nodes.
    let echo = functions
        .iter()
        .find(|f| f["name"] == "echo")
        .expect("echo");
    assert_eq!(echo["nodes"].as_array().map(Vec::len), Some(2));
    for n in [b, a] {
        n.shutdown().await;
    }
}
