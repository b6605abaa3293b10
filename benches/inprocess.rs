//! In-process costs of mpreg, without sockets: planning, executing on one
//! node, and the wire encoding.
//!
//! ```text
//! cargo bench --bench inprocess
//! ```

use divan::Bencher;
use mpreg::{Command, Node, NodeHandle, Request};
use serde_json::{Map, Value, json};

fn main() {
    divan::main();
}

/// `n` commands, each consuming the previous one's result.
fn chain(n: usize) -> Vec<Command> {
    let mut cmds = vec![Command::new("c0", "echo").arg("x")];
    for i in 1..n {
        cmds.push(Command::new(format!("c{i}"), "echo").arg(format!("c{}", i - 1)));
    }
    cmds
}

/// One root and `n` commands that all consume it.
fn fan_out(n: usize) -> Vec<Command> {
    let mut cmds = vec![Command::new("root", "echo").arg(7)];
    for i in 0..n {
        cmds.push(Command::new(format!("f{i}"), "echo").arg("root"));
    }
    cmds
}

#[divan::bench(args = [1, 10, 1000])]
fn plan(bencher: Bencher<'_, '_>, n: usize) {
    bencher
        .with_inputs(|| chain(n))
        .bench_values(mpreg::__bench::plan);
}

/// A node in this process that does not listen and has no peers.
fn local_node(rt: &tokio::runtime::Runtime) -> NodeHandle {
    rt.block_on(
        Node::builder()
            .dial_out_only()
            .without_linked_functions()
            .start(),
    )
    .expect("start an in-process node")
}

fn run(bencher: Bencher<'_, '_>, make: fn(usize) -> Vec<Command>, n: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let node = local_node(&rt);
    bencher
        .with_inputs(|| make(n).into_iter().collect::<Request>())
        .bench_values(|request| rt.block_on(node.send(request)).expect("runs"));
    rt.block_on(node.shutdown());
}

#[divan::bench(args = [1, 1000])]
fn execute_chain(bencher: Bencher<'_, '_>, n: usize) {
    run(bencher, chain, n);
}

#[divan::bench(args = [1000])]
fn execute_fan_out(bencher: Bencher<'_, '_>, n: usize) {
    run(bencher, fan_out, n);
}

#[divan::bench]
fn parse_echo_frame(bencher: Bencher<'_, '_>) {
    let frame = json!({"role": "rpc", "u": "01J", "cmds": [
        {"name": "first", "fun": "echo", "args": ["hi there!"], "locs": []}
    ]})
    .to_string();
    bencher.bench(|| mpreg::__bench::parse_frame(divan::black_box(frame.as_bytes())));
}

#[divan::bench(args = [1 << 10, 1 << 20])]
fn parse_and_encode_payload(bencher: Bencher<'_, '_>, bytes: usize) {
    let numbers: Vec<f64> = (0..bytes / 8).map(|i| i as f64 * 0.5).collect();
    let frame =
        json!({"u": 1, "cmds": [{"name": "a", "fun": "echo", "args": [numbers]}]}).to_string();
    bencher
        .counter(divan::counter::BytesCount::new(frame.len()))
        .bench(|| {
            let n = mpreg::__bench::parse_frame(divan::black_box(frame.as_bytes()));
            let mut results = Map::new();
            results.insert("a".into(), Value::from(n.unwrap_or(0)));
            mpreg::__bench::encode_reply(json!(1), results)
        });
}
