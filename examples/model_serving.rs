//! Model serving with mpreg: one function, `predict`, served by several
//! nodes, each with a different model (a **dataset**), called through a
//! balancer by dataset.
//!
//! ```text
//! cargo run --example model_serving
//! ```
//!
//! Everything runs in this one process, on loopback:
//!
//! - `balancer`: no datasets, no models; the only node the client talks to;
//! - `small-1` and `small-2`: two replicas of `model-small` (a linear model);
//! - `large`: `model-large` (a tiny two-layer network);
//! - `eu`: `model-eu` (a linear model with other weights).
//!
//! `predict` is one `#[mpreg::rpc]` function taking the model as a typed
//! dataset parameter (`model: Dataset<Served>`). Each worker builds its
//! model in code at start (standing in for loading weights from disk) and
//! gives it to its node as the state of its dataset
//! (`Node::builder().dataset("model-small", ...)`); a call gets the model
//! of the dataset its command names. The example then shows:
//!
//! 1. the same features sent to every model, chosen by dataset;
//! 2. load balancing: 20 concurrent calls for `model-small`, spread over its
//!    two replicas (each replica counts the predictions it makes);
//! 3. a pipeline in one request: the features go to both `model-small` and
//!    `model-large` and the two predictions are combined, with where each
//!    step ran;
//! 4. the errors a caller gets for a model nobody serves
//!    (`no_node_for_datasets`) and for malformed features (`bad_arguments`).
//!
//! It exits with status 1 and a message on stderr if the cluster does not
//! form, a result is wrong, or anything takes too long.

use std::collections::BTreeMap;
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mpreg::{
    Client, ClusterView, Command, Dataset, ErrorCode, Node, NodeBuilder, NodeHandle, Request,
};
use serde_json::{Value, json};
use tokio::task::JoinSet;

/// How long the cluster may take to form.
const CONVERGE: Duration = Duration::from_secs(10);
/// Deadline of every request.
const REQUEST: Duration = Duration::from_secs(5);
/// Bound on any other single step (connecting, stopping a node).
const STEP: Duration = Duration::from_secs(10);
/// How many features every model takes.
const FEATURES: usize = 3;
/// The example input.
const INPUT: [f64; FEATURES] = [1.0, 2.0, 3.0];

/// The error type of this example: any error, with a readable message.
type BoxError = Box<dyn std::error::Error>;

/// A tiny regression model over [`FEATURES`] inputs.
#[derive(Debug)]
enum Model {
    /// `y = w·x + b`.
    Linear { w: [f64; FEATURES], b: f64 },
    /// One hidden `ReLU` layer: `y = out·relu(W·x + c) + b`.
    TwoLayer {
        hidden: Vec<([f64; FEATURES], f64)>,
        out: Vec<f64>,
        b: f64,
    },
}

impl Model {
    /// The model behind `dataset`, built in code.
    fn build(dataset: &str) -> Option<Self> {
        match dataset {
            "model-small" => Some(Model::Linear {
                w: [0.5, -0.25, 1.0],
                b: 0.5,
            }),
            "model-eu" => Some(Model::Linear {
                w: [0.75, 0.5, -0.5],
                b: 2.0,
            }),
            "model-large" => Some(Model::TwoLayer {
                hidden: vec![
                    ([1.0, 0.0, 0.5], 0.0),
                    ([-1.0, 1.0, 0.0], 0.5),
                    ([0.0, -1.0, 0.25], 0.0),
                    ([0.5, 0.5, 0.5], -1.0),
                ],
                out: vec![1.0, 2.0, -1.0, 0.5],
                b: 0.25,
            }),
            _ => None,
        }
    }

    fn predict(&self, x: &[f64; FEATURES]) -> f64 {
        let dot = |w: &[f64; FEATURES]| w.iter().zip(x).map(|(w, x)| w * x).sum::<f64>();
        match self {
            Model::Linear { w, b } => dot(w) + b,
            Model::TwoLayer { hidden, out, b } => {
                hidden
                    .iter()
                    .zip(out)
                    .map(|((w, c), o)| o * (dot(w) + c).max(0.0))
                    .sum::<f64>()
                    + b
            }
        }
    }
}

/// What a worker serves for its dataset: the model, and how many
/// predictions it made (shared with `main`, which reports them).
struct Served {
    model: Model,
    predictions: Arc<AtomicUsize>,
}

/// Predicts a value from 3 numeric features with the model of the dataset
/// the command names.
#[mpreg::rpc(idempotent)]
fn predict(features: [f64; FEATURES], model: Dataset<Served>) -> f64 {
    model.predictions.fetch_add(1, Ordering::Relaxed);
    model.model.predict(&features)
}

/// A started worker and the count of predictions it made.
struct Worker {
    node: NodeHandle,
    dataset: String,
    served: Arc<AtomicUsize>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("model_serving: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the cluster, runs the demo, and stops every node that started
/// (whether the demo succeeded or not).
async fn run() -> Result<(), BoxError> {
    println!("== starting the cluster");
    let mut balancer = None;
    let mut workers: Vec<Worker> = Vec::new();
    let outcome = async {
        let lb = start(node("balancer").without_function("predict")).await?;
        let seed = url(&lb)?;
        println!("node {:<8} listening on {seed}", lb.name());
        let lb = balancer.insert(lb);
        for (name, dataset) in [
            ("small-1", "model-small"),
            ("small-2", "model-small"),
            ("large", "model-large"),
            ("eu", "model-eu"),
        ] {
            let model = Model::build(dataset).ok_or_else(|| format!("no model {dataset}"))?;
            let served = Arc::new(AtomicUsize::new(0));
            let state = Served {
                model,
                predictions: served.clone(),
            };
            let builder = node(name).dataset(dataset, state).peers([&seed]);
            let worker = start(builder).await?;
            println!(
                "node {:<8} listening on {} with {dataset}",
                worker.name(),
                url(&worker)?
            );
            workers.push(Worker {
                node: worker,
                dataset: dataset.to_owned(),
                served,
            });
        }
        demo(lb, &workers).await
    }
    .await;

    println!();
    println!("== shutting down");
    let nodes = workers
        .into_iter()
        .map(|w| w.node)
        .chain(balancer)
        .collect::<Vec<_>>();
    for n in nodes {
        let name = n.name().to_owned();
        match tokio::time::timeout(STEP, n.shutdown()).await {
            Ok(()) => println!("node {name} stopped"),
            Err(_) => eprintln!("node {name} did not stop within {STEP:?}"),
        }
    }
    outcome
}

/// A node of this demo: loopback, OS-chosen port, quick failure detection
/// and a short shutdown grace. It serves `predict` (with the models of its
/// datasets) and the built-ins.
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

/// Whether `view` lists node `name` serving `predict` with `dataset`.
fn serves(view: &ClusterView, name: &str, dataset: &str) -> bool {
    view.node(name)
        .is_some_and(|n| n.offers("predict", &[dataset]))
}

/// A `predict` command for `dataset`, with the features as a kwarg.
fn predict_on(name: &str, dataset: &str, features: Value) -> Command {
    Command::new(name, "predict")
        .kwarg("features", features)
        .dataset(dataset)
}

/// How many predictions each worker has made so far, by node name.
fn counts(workers: &[Worker]) -> BTreeMap<String, usize> {
    workers
        .iter()
        .map(|w| (w.node.name().to_owned(), w.served.load(Ordering::Relaxed)))
        .collect()
}

/// The workers whose count grew between two snapshots.
fn ran_on<'a>(
    before: &BTreeMap<String, usize>,
    after: &'a BTreeMap<String, usize>,
) -> Vec<&'a str> {
    after
        .iter()
        .filter(|(name, n)| before.get(*name).is_some_and(|b| *n > b))
        .map(|(name, _)| name.as_str())
        .collect()
}

/// Everything that happens while the cluster is up. `balancer` is the only
/// node the client talks to.
async fn demo(balancer: &NodeHandle, workers: &[Worker]) -> Result<(), BoxError> {
    // Wait until the balancer sees every worker's `predict` with its model.
    let converged = balancer
        .wait_for(CONVERGE, |view| {
            workers
                .iter()
                .all(|w| serves(view, w.node.name(), &w.dataset))
        })
        .await;
    if !converged {
        return Err(format!(
            "the cluster did not converge within {CONVERGE:?}; the balancer sees {}",
            balancer.cluster_view()
        )
        .into());
    }
    println!("cluster converged: the balancer sees predict on every worker");

    let client = bounded(
        "connecting to the balancer",
        Client::builder().timeout(REQUEST).connect(&url(balancer)?),
    )
    .await??;

    each_model(&client, workers).await?;
    load_balancing(&client, workers).await?;
    pipeline(&client, workers).await?;
    errors(&client).await?;

    println!();
    println!("== predictions made, by node");
    for w in workers {
        let made = w.served.load(Ordering::Relaxed);
        println!("  {:<8} {made}", w.node.name());
    }
    Ok(())
}

/// What `dataset`'s model predicts for `x`, computed here (to check the
/// cluster's answers).
fn local_prediction(dataset: &str, x: &[f64; FEATURES]) -> Result<f64, BoxError> {
    let model = Model::build(dataset).ok_or_else(|| format!("no model {dataset}"))?;
    Ok(model.predict(x))
}

/// Whether two predictions agree (JSON carries them exactly in practice;
/// the margin is for safety).
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

/// Part 1: the same input, every model, chosen by dataset.
async fn each_model(client: &Client, workers: &[Worker]) -> Result<(), BoxError> {
    println!();
    println!("== predict({INPUT:?}) with each model");
    for dataset in ["model-small", "model-large", "model-eu"] {
        let before = counts(workers);
        let y: f64 = client
            .call_command(predict_on("y", dataset, json!(INPUT)))
            .await?;
        let expected = local_prediction(dataset, &INPUT)?;
        if !close(y, expected) {
            return Err(format!("{dataset}: got {y}, expected {expected}").into());
        }
        let on = ran_on(&before, &counts(workers)).join(", ");
        let at = format!("[{dataset}]");
        println!("  predict @ {at:<13} = {y:<5} (ran on {on})");
    }
    Ok(())
}

/// Part 2: concurrent calls for `model-small`, spread over its two replicas.
async fn load_balancing(client: &Client, workers: &[Worker]) -> Result<(), BoxError> {
    const CALLS: u32 = 20;
    println!();
    println!("== {CALLS} concurrent predict calls @ [model-small]");
    let before = counts(workers);
    let mut calls = JoinSet::new();
    for i in 0..CALLS {
        let client = client.clone();
        let x = [f64::from(i), 1.0, 0.5];
        calls.spawn(async move {
            let y = client
                .call_command::<f64>(predict_on("y", "model-small", json!(x)))
                .await;
            (x, y)
        });
    }
    let mut answers = 0;
    while let Some(joined) = calls.join_next().await {
        let (x, y) = joined?;
        let (y, expected) = (y?, local_prediction("model-small", &x)?);
        if !close(y, expected) {
            return Err(format!("model-small on {x:?}: got {y}, expected {expected}").into());
        }
        answers += 1;
    }
    let after = counts(workers);
    println!("  {answers} correct answers; predictions made by each replica:");
    for w in workers.iter().filter(|w| w.dataset == "model-small") {
        let name = w.node.name();
        let made = after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
        println!("    {name}: {made:>2} {}", "#".repeat(made));
    }
    Ok(())
}

/// Part 3: one request: the features go to two models, and their predictions
/// are combined.
async fn pipeline(client: &Client, workers: &[Worker]) -> Result<(), BoxError> {
    println!();
    println!("== one request, two models (return_intermediate_results)");
    let request = Request::new()
        .cmd(Command::new("features", "echo").arg(json!(INPUT)))
        .cmd(
            Command::new("small", "predict")
                .arg("features")
                .dataset("model-small"),
        )
        .cmd(
            Command::new("large", "predict")
                .arg("features")
                .dataset("model-large"),
        )
        .cmd(Command::new("both", "echos").arg("small").arg("large"))
        .cmd(Command::new("entry", "mpreg.whoami"))
        .return_intermediate_results(true);
    println!("request: {}", json!({ "cmds": request.cmds }));
    let before = counts(workers);
    let results = client.send(request).await?;
    // Which worker made each prediction: the one whose count grew.
    let after = counts(workers);
    let grew = ran_on(&before, &after);
    let made_by = |dataset: &str| {
        workers
            .iter()
            .find(|w| w.dataset == dataset && grew.contains(&w.node.name()))
            .map_or("?", |w| w.node.name())
    };
    // Commands without datasets: where `mpreg.whoami` (also without) ran.
    let entry: String = results.get("entry")?;
    for (name, call, on) in [
        ("features", format!("echo({INPUT:?})"), entry.as_str()),
        (
            "small",
            "predict(features) @ [model-small]".to_owned(),
            made_by("model-small"),
        ),
        (
            "large",
            "predict(features) @ [model-large]".to_owned(),
            made_by("model-large"),
        ),
        ("both", "echos(small, large)".to_owned(), entry.as_str()),
    ] {
        let value = results.value(name).unwrap_or(&Value::Null).to_string();
        println!("  {name:<8} = {call:<34} -> {value:<13} (ran on {on})");
    }
    let both: Vec<f64> = results.get("both")?;
    let expected = vec![
        local_prediction("model-small", &INPUT)?,
        local_prediction("model-large", &INPUT)?,
    ];
    if both.len() != expected.len() || !both.iter().zip(&expected).all(|(a, b)| close(*a, *b)) {
        return Err(format!("pipeline: got {both:?}, expected {expected:?}").into());
    }
    println!("  result: {}", json!({ "both": both }));
    Ok(())
}

/// Part 4: errors a caller should expect, and handle.
async fn errors(client: &Client) -> Result<(), BoxError> {
    println!();
    println!("== errors");
    for (what, command, expected) in [
        (
            "a model nobody serves",
            predict_on("y", "model-xl", json!(INPUT)),
            ErrorCode::NoNodeForDatasets,
        ),
        (
            "two features instead of three",
            predict_on("y", "model-eu", json!([1.0, 2.0])),
            ErrorCode::BadArguments,
        ),
    ] {
        match client.call_command::<f64>(command).await {
            Err(mpreg::Error::Rpc(e)) if e.code == expected => {
                println!("  {what}: {}: {}", e.code, e.message);
            }
            Err(e) => return Err(format!("{what}: expected {expected}, got {e}").into()),
            Ok(y) => return Err(format!("{what}: expected {expected}, got {y}").into()),
        }
    }
    Ok(())
}
