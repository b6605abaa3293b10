//! A real mpreg cluster in one process: a balancer and two workers on
//! loopback, joined by gossip, driven by a client that talks to the balancer
//! only.
//!
//! ```text
//! cargo run --example echo_cluster
//! ```
//!
//! What it does:
//!
//! 1. starts `balancer` (no datasets), `worker-ab` (datasets `model-a`,
//!    `model-b`) and `worker-c` (dataset `model-c`), each on an OS-chosen
//!    port; the workers know only the balancer's URL and find the rest by
//!    gossip. It waits (bounded) until the balancer sees every node with its
//!    datasets;
//! 2. runs the five reference requests of the original project through the
//!    balancer, printing each request and its result as JSON and checking
//!    the result;
//! 3. runs one request whose commands run on different nodes, chosen by
//!    dataset, and prints where each ran and what flowed between them
//!    (`mpreg.whoami` answers with the name of the node that ran it; a
//!    command without datasets runs on the balancer itself unless it is
//!    busier than the other nodes that could run it);
//! 4. prints the cluster as the balancer sees it;
//! 5. shuts every node down gracefully.
//!
//! It exits with status 1 and a message on stderr if the cluster does not
//! form, a result is not the expected one, or anything takes too long.

use std::collections::BTreeSet;
use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use mpreg::{Client, ClusterView, Command, Node, NodeBuilder, NodeHandle, NodeStatus, Request};
use serde_json::{Value, json};

/// How long the cluster may take to form.
const CONVERGE: Duration = Duration::from_secs(10);
/// Deadline of every request (the node enforces it; the client waits a
/// little longer).
const REQUEST: Duration = Duration::from_secs(5);
/// Bound on any other single step (connecting, stopping a node).
const STEP: Duration = Duration::from_secs(10);

/// The error type of this example: any error, with a readable message.
type BoxError = Box<dyn std::error::Error>;

/// `greet(node)`: a greeting from `node`. Linked into this binary, so every
/// node of this process serves it.
#[mpreg::rpc(idempotent)]
fn greet(node: String) -> String {
    format!("hello from {node}")
}

/// `shout(text)`: upper-cases `text`. Also served by every node.
#[mpreg::rpc(idempotent)]
fn shout(text: String) -> String {
    text.to_uppercase()
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo_cluster: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the cluster, runs the demo, and stops every node that started
/// (whether the demo succeeded or not).
async fn run() -> Result<(), BoxError> {
    println!("== starting the cluster");
    let mut nodes: Vec<NodeHandle> = Vec::new();
    let outcome = async {
        let balancer = start(node("balancer")).await?;
        let seed = url(&balancer)?;
        nodes.push(balancer);
        nodes.push(
            start(
                node("worker-ab")
                    .datasets(["model-a", "model-b"])
                    .peers([&seed]),
            )
            .await?,
        );
        nodes.push(start(node("worker-c").datasets(["model-c"]).peers([&seed])).await?);
        for n in &nodes {
            println!("node {:<10} listening on {}", n.name(), url(n)?);
        }
        demo(&nodes[0]).await
    }
    .await;

    println!();
    println!("== shutting down");
    // Workers first, the balancer (their seed) last.
    for n in nodes.into_iter().rev() {
        let name = n.name().to_owned();
        match tokio::time::timeout(STEP, n.shutdown()).await {
            Ok(()) => println!("node {name} stopped"),
            Err(_) => eprintln!("node {name} did not stop within {STEP:?}"),
        }
    }
    outcome
}

/// A node of this demo: loopback, OS-chosen port, quick failure detection
/// and a short shutdown grace (nothing here runs long).
fn node(name: &str) -> NodeBuilder {
    Node::builder()
        .name(name)
        .listen("127.0.0.1:0")
        .failure_detection(Duration::from_millis(200), Duration::from_secs(1))
        .shutdown_grace(Duration::from_secs(2))
}

async fn start(builder: NodeBuilder) -> Result<NodeHandle, BoxError> {
    Ok(bounded("starting a node", builder.start()).await??)
}

fn url(node: &NodeHandle) -> Result<String, BoxError> {
    node.url()
        .ok_or_else(|| format!("node {} does not listen", node.name()).into())
}

/// Runs `fut`, failing instead of hanging if it takes longer than [`STEP`].
async fn bounded<F: Future>(what: &str, fut: F) -> Result<F::Output, BoxError> {
    tokio::time::timeout(STEP, fut)
        .await
        .map_err(|_| format!("{what} took longer than {STEP:?}").into())
}

/// Everything that happens while the cluster is up. `balancer` is the only
/// node the client talks to.
async fn demo(balancer: &NodeHandle) -> Result<(), BoxError> {
    // 1. Wait until the balancer sees both workers, with their datasets.
    let want = [
        ("balancer", vec![]),
        ("worker-ab", vec!["model-a", "model-b"]),
        ("worker-c", vec!["model-c"]),
    ];
    let converged = balancer
        .wait_for(CONVERGE, |view| {
            want.iter().all(|(name, datasets)| {
                node_datasets(view, name)
                    .is_some_and(|have| datasets.iter().all(|d| have.contains(*d)))
            })
        })
        .await;
    if !converged {
        return Err(format!(
            "the cluster did not converge within {CONVERGE:?}; the balancer sees {:?}",
            balancer.cluster_view().node_names()
        )
        .into());
    }
    println!("cluster converged: the balancer sees every node and its datasets");

    let client = bounded(
        "connecting to the balancer",
        Client::builder().timeout(REQUEST).connect(&url(balancer)?),
    )
    .await??;

    // 2. The five reference requests.
    println!();
    println!("== the five reference requests (through the balancer)");
    for (i, example) in mpreg::demo::reference_examples().into_iter().enumerate() {
        let n = i + 1;
        println!("request {n}: {}", json!({ "cmds": example.request.cmds }));
        let results = Value::Object(client.send(example.request).await?.into_map());
        println!("result  {n}: {results}");
        if results != example.expected {
            return Err(format!(
                "reference request {n}: got {results}, expected {}",
                example.expected
            )
            .into());
        }
    }
    println!("all five results are as expected");

    // 3. One request, three nodes: routed by datasets.
    println!();
    println!("== one request across the cluster (return_intermediate_results)");
    let request = Request::new()
        .cmd(Command::new("where_a", "mpreg.whoami").dataset("model-a"))
        .cmd(
            Command::new("greeting", "greet")
                .arg("where_a")
                .dataset("model-a"),
        )
        .cmd(Command::new("where_c", "mpreg.whoami").dataset("model-c"))
        .cmd(
            Command::new("loud", "shout")
                .arg("greeting")
                .dataset("model-c"),
        )
        .cmd(Command::new("where_lb", "mpreg.whoami"))
        .cmd(
            Command::new("combined", "echos")
                .arg("loud")
                .arg("where_a")
                .arg("where_c")
                .arg("where_lb"),
        )
        .return_intermediate_results(true);
    println!("request: {}", json!({ "cmds": request.cmds }));
    let results = client.send(request.clone()).await?;
    for cmd in &request.cmds {
        let call = format!("{}({})", cmd.fun, render_args(&cmd.args));
        let on = if cmd.locs.is_empty() {
            "any node".to_owned()
        } else {
            format!("[{}]", cmd.locs.join(", "))
        };
        let value = results.value(&cmd.name).unwrap_or(&Value::Null);
        println!("  {:<9} = {call:<42} @ {on:<10} -> {value}", cmd.name);
    }
    let where_a: String = results.get("where_a")?;
    let where_c: String = results.get("where_c")?;
    let where_lb: String = results.get("where_lb")?;
    let loud: String = results.get("loud")?;
    println!(
        "the greeting was made on {where_a}, shouted on {where_c} and combined on {where_lb}: {loud:?}"
    );
    if where_a != "worker-ab" || where_c != "worker-c" || loud != "HELLO FROM WORKER-AB" {
        return Err("commands did not run where their datasets are".into());
    }

    // 4. The cluster as the balancer sees it.
    println!();
    println!("== the cluster as the balancer sees it");
    print_view(&balancer.cluster_view());
    Ok(())
}

/// A command's arguments as `a, "b", 3`: references appear as bare names.
fn render_args(args: &[Value]) -> String {
    args.iter()
        .map(|a| match a {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every dataset node `name` has (over all its functions), if the view lists
/// that node.
fn node_datasets<'v>(view: &'v ClusterView, name: &str) -> Option<BTreeSet<&'v str>> {
    let node = view.node(name)?;
    Some(
        node.functions
            .iter()
            .flat_map(|f| &f.datasets)
            .map(String::as_str)
            .collect(),
    )
}

/// One line per node: name, address, status, and its functions grouped by
/// the datasets they have there.
fn print_view(view: &ClusterView) {
    for node in &view.nodes {
        // Functions with the same datasets, together, in order of first
        // appearance.
        let mut groups: Vec<(Vec<&str>, Vec<&str>)> = Vec::new();
        for f in &node.functions {
            let datasets: Vec<&str> = f.datasets.iter().map(String::as_str).collect();
            match groups.iter_mut().find(|(d, _)| *d == datasets) {
                Some((_, funs)) => funs.push(&f.fun),
                None => groups.push((datasets, vec![&f.fun])),
            }
        }
        let functions = groups
            .iter()
            .map(|(datasets, funs)| {
                if datasets.is_empty() {
                    funs.join(", ")
                } else {
                    format!("{} @ [{}]", funs.join(", "), datasets.join(", "))
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        let status = match node.status {
            NodeStatus::This => "self",
            NodeStatus::Up => "up",
            NodeStatus::Leaf => "leaf",
            _ => "?",
        };
        let addr = node.addr.map_or_else(|| "-".to_owned(), |a| a.to_string());
        println!("  {:<10} {addr:<16} {status:<5} {functions}", node.name);
    }
}
