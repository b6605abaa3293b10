//! Result budgets: a request holds at most its reply budget of results
//! (shared, never copied per reference), a peer's oversized result fails
//! its job and never the link, and the node's requests together hold at
//! most `max_inflight_bytes`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{builder, guard, start_node, url};
use mpreg::{Client, Command, ErrorCode, Function, Request, RpcError};
use serde_json::{Value, json};
use tokio::sync::Notify;

/// `a = echo("x" * 100)`, then `l1..l{levels}`, each `echos(prev, prev)`:
/// 1.2 KB of request whose results double at every level.
fn doubling(levels: usize, locs: &[&str]) -> Request {
    let mut request = Request::new().cmd(
        Command::new("a", "echo")
            .arg("x".repeat(100))
            .datasets(locs.iter().copied()),
    );
    let mut prev = "a".to_owned();
    for i in 1..=levels {
        let name = format!("l{i}");
        request = request.cmd(
            Command::new(name.as_str(), "echos")
                .arg(prev.as_str())
                .arg(prev.as_str())
                .datasets(locs.iter().copied()),
        );
        prev = name;
    }
    request
}

/// The first level of [`doubling`] whose result is over `budget` bytes.
fn first_level_over(budget: usize) -> String {
    // `"x"*100` is 102 bytes of JSON; `[p,p]` is twice `p` plus 3.
    let mut bytes = 102usize;
    for i in 1.. {
        bytes = 2 * bytes + 3;
        if bytes > budget {
            return format!("l{i}");
        }
    }
    unreachable!()
}

/// Calls `echo` on `client` until `stop`, counting calls and failures.
fn bystander(client: Client, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, usize)> {
    tokio::spawn(async move {
        let (mut ok, mut failed) = (0, 0);
        // Bounded: the attack ends well within the hang guard.
        for i in 0..100_000u64 {
            if stop.load(Ordering::Relaxed) && ok > 0 {
                break;
            }
            match client.call::<u64>("echo", (i,)).await {
                Ok(n) if n == i => ok += 1,
                other => {
                    eprintln!("bystander call failed: {other:?}");
                    failed += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (ok, failed)
    })
}

#[tokio::test]
async fn doubling_references_stop_at_the_reply_budget_and_memory_stays_bounded() {
    // A node in its own process, so its memory is its own.
    let server = common::process::Server::start(&[]).await;
    let node_url = server.url.clone();

    let attacker = guard("connect", Client::connect(&node_url))
        .await
        .expect("connect");
    let other = guard("connect", Client::connect(&node_url))
        .await
        .expect("connect");
    let stop = Arc::new(AtomicBool::new(false));
    let served = bystander(other, stop.clone());

    // 22 levels would be a 420 MiB reply; the budget is the node's 64 MiB,
    // or the little less the client asks for (room for the envelope).
    for _ in 0..2 {
        let e = common::rpc_error(
            guard("doubling request", attacker.send(doubling(22, &[]))).await,
            ErrorCode::TooLarge,
        );
        let budget = e
            .details
            .as_ref()
            .and_then(|d| d["limit"].as_u64())
            .expect("the limit in the details");
        assert!((63 << 20..=64 << 20).contains(&budget), "budget {budget}");
        let budget = usize::try_from(budget).expect("fits");
        assert_eq!(
            e.command.as_deref(),
            Some(first_level_over(budget).as_str()),
            "{e}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = guard("bystander", served).await.expect("join");
    assert!(
        ok > 0 && failed == 0,
        "the other client: {ok} ok, {failed} failed"
    );
    // The node still answers, and held far less than the 1.6 GiB it took
    // before (the largest result it held is under 64 MiB of JSON; its
    // tree and one copy for the handler are a few times that).
    let n: u64 = guard("echo after", attacker.call("echo", (7,)))
        .await
        .expect("served");
    assert_eq!(n, 7);
    let peak_mib = server.memory_kib().1 / 1024;
    eprintln!("peak RSS of the node: {peak_mib} MiB");
    assert!(peak_mib < 600, "peak RSS {peak_mib} MiB");
}

#[tokio::test]
async fn a_peers_oversized_result_fails_its_job_and_never_the_link() {
    // Small messages, so the attack is quick: B holds dataset "d".
    let limit = 256 << 10;
    let b = start_node(builder().name("b").datasets(["d"]).max_message_size(limit)).await;
    let a = start_node(builder().name("a").max_message_size(limit).peers([url(&b)])).await;
    let routed = a
        .wait_for(common::HANG_GUARD, |view| {
            view.nodes_with_dataset("d") == 1 && view.nodes.len() == 2
        })
        .await;
    assert!(routed, "a routes to b's dataset");

    let attacker = common::client(&a).await;
    let stop = Arc::new(AtomicBool::new(false));
    // Another client's calls go through the same link all along.
    let through_link = common::client(&a).await;
    let stop2 = stop.clone();
    let served = tokio::spawn(async move {
        let (mut ok, mut failed) = (0usize, 0usize);
        for i in 0..100_000u64 {
            if stop2.load(Ordering::Relaxed) && ok > 0 {
                break;
            }
            let request = Request::new().cmd(Command::new("e", "echo").arg(i).datasets(["d"]));
            match through_link.send(request).await {
                Ok(r) if r.get::<u64>("e").ok() == Some(i) => ok += 1,
                other => {
                    eprintln!("call through the link failed: {other:?}");
                    failed += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (ok, failed)
    });

    for _ in 0..3 {
        // The chain runs on b, which answers too_large for the job.
        let e = common::rpc_error(
            guard("chain on b", attacker.send(doubling(14, &["d"]))).await,
            ErrorCode::TooLarge,
        );
        assert_eq!(
            e.command.as_deref(),
            Some(first_level_over(limit).as_str()),
            "{e}"
        );
        // One oversized result on b (the arguments fit, the result not).
        let big = "y".repeat(100 << 10);
        let e = common::rpc_error(
            guard(
                "one call on b",
                attacker.send(
                    Request::new()
                        .cmd(Command::new("b", "echo").arg(big.as_str()).datasets(["d"]))
                        .cmd(
                            Command::new("three", "echos")
                                .arg("b")
                                .arg("b")
                                .arg("b")
                                .datasets(["d"]),
                        ),
                ),
            )
            .await,
            ErrorCode::TooLarge,
        );
        assert_eq!(e.command.as_deref(), Some("three"), "{e}");
        // Arguments too large for the link fail before they are sent.
        let huge = "z".repeat(300 << 10);
        let e = common::rpc_error(
            guard(
                "huge args",
                a.send(
                    Request::new()
                        .cmd(Command::new("h", "echo").arg(huge.as_str()).datasets(["d"])),
                ),
            )
            .await,
            ErrorCode::TooLarge,
        );
        assert_eq!(e.command.as_deref(), Some("h"), "{e}");
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = guard("calls through the link", served).await.expect("join");
    assert!(
        ok > 0 && failed == 0,
        "through the link: {ok} ok, {failed} failed"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_result_read_many_times_counts_once() {
    // 4 KiB of results: `a` (2 KiB) is read by 40 commands and is in the
    // reply too; each `n_i` is a small number.
    let node = start_node(
        builder()
            .function(Function::new("len", |args: mpreg::Args| async move {
                let n = args
                    .positional()
                    .first()
                    .and_then(Value::as_str)
                    .map_or(0, str::len);
                Ok::<_, RpcError>(json!(n))
            }))
            .config({
                let mut c = mpreg::Config::default();
                c.listen = "127.0.0.1:0".into();
                c.max_reply_bytes = Some(4 << 10);
                c
            })
            .without_linked_functions(),
    )
    .await;
    let mut request = Request::new()
        .cmd(Command::new("a", "echo").arg("x".repeat(2000)))
        .return_intermediate_results(true);
    for i in 0..40 {
        request = request.cmd(Command::new(format!("n{i}").as_str(), "len").arg("a"));
    }
    let results = guard("fan-out", node.send(request))
        .await
        .expect("within budget");
    assert_eq!(results.get::<usize>("n39").expect("n39"), 2000);
    assert_eq!(results.get::<String>("a").expect("a").len(), 2000);
    // Two distinct results of 2 KiB do not fit.
    let e = common::rpc_error(
        guard(
            "two big results",
            node.send(
                Request::new()
                    .cmd(Command::new("a", "echo").arg("x".repeat(2000)))
                    .cmd(Command::new("b", "echo").arg("y".repeat(2100)))
                    .cmd(Command::new("c", "echos").arg("a").arg("b")),
            ),
        )
        .await,
        ErrorCode::TooLarge,
    );
    assert!(e.command.is_some(), "{e}");
    node.shutdown().await;
}

#[tokio::test]
async fn requests_together_hold_at_most_the_nodes_budget() {
    let gate = Arc::new(Notify::new());
    let entered = Arc::new(AtomicUsize::new(0));
    let wait = {
        let gate = gate.clone();
        let entered = entered.clone();
        Function::new("wait", move |_| {
            let gate = gate.clone();
            let entered = entered.clone();
            async move {
                entered.fetch_add(1, Ordering::SeqCst);
                gate.notified().await;
                Ok::<_, RpcError>(json!("released"))
            }
        })
    };
    let mut config = mpreg::Config::default();
    config.listen = "127.0.0.1:0".into();
    config.max_inflight_bytes = 2 << 20;
    let node = start_node(builder().config(config).function(wait)).await;
    let holder = common::client(&node).await;
    let other = common::client(&node).await;
    let big = "x".repeat(700 << 10);
    // Holds its 700 KiB frame and its 700 KiB result until `wait` ends.
    let held = tokio::spawn({
        let big = big.clone();
        async move {
            holder
                .send(
                    Request::new()
                        .cmd(Command::new("big", "echo").arg(big.as_str()))
                        .cmd(Command::new("w", "wait")),
                )
                .await
        }
    });
    common::wait_until("the first request holds its bytes", || {
        entered.load(Ordering::SeqCst) == 1
    })
    .await;
    let request = || Request::new().cmd(Command::new("e", "echo").arg(big.as_str()));
    common::rpc_error(
        guard("over the node's budget", other.send(request())).await,
        ErrorCode::Overloaded,
    );
    // Small requests still fit.
    let n: u64 = guard("small", other.call("echo", (3,)))
        .await
        .expect("served");
    assert_eq!(n, 3);
    gate.notify_one();
    let first = guard("first request", held)
        .await
        .expect("join")
        .expect("ok");
    assert_eq!(first.get::<String>("w").expect("w"), "released");
    // Its bytes were given back.
    let again = guard("retry", other.send(request()))
        .await
        .expect("fits now");
    assert_eq!(again.get::<String>("e").expect("e").len(), big.len());
    node.shutdown().await;
}
