//! The `mpreg` command: run a node, or talk to one.
//!
//! ```text
//! mpreg server [--config FILE.toml|FILE.yaml] [--name N] [--listen HOST:PORT] [--peer URL]...
//!              [--dataset D]... [--diagnostics]
//! mpreg client URL call FUN [JSON-ARG]... [--dataset D]...
//! mpreg client URL request FILE [--stream]
//! mpreg client URL demo
//! mpreg cluster URL [--json]
//! mpreg bench [URL] [--connections C] [--inflight D] [--duration S]
//!             [--warmup S] [--timeout S] [--request FILE] [--baseline] [--json]
//! mpreg bench suite [--json] [--quick]
//! mpreg bench hostile [--secs N] [--json] [--max-rss-mib M]
//! mpreg bench cluster [--nodes N] [--processes P] [--timeout S] [--idle-secs S] [--json]
//! ```
//!
//! `cluster` asks the node at URL for its view of the cluster (the built-in
//! `mpreg.cluster`) and prints one row per node: name, address, status
//! (`self`, `up` or `leaf`), load, jobs sent to it, and the functions it
//! offers, each with its datasets in brackets when it has any. `--json`
//! prints the view as returned instead.
//!
//! `bench` drives a node (or any server speaking the protocol) with C
//! WebSocket connections, each keeping D requests in flight, and prints
//! throughput and latency percentiles; `--baseline` measures a bare
//! WebSocket JSON server started in this process with the same load, in the
//! same run, and prints the ratios. `bench suite` measures every target of
//! `BENCHMARKS.md` in one run (see `mpreg/src/bin/mpreg/bench/`).
//! `bench hostile` starts a node (with a client token and a cluster secret)
//! and measures a well-behaved client for N seconds (default 10) with the
//! node to itself, then for N seconds while attackers of every kind run at
//! once (reference doubling, silent and oversized connections, readers that
//! never read, ping floods, unproven peers, deep nesting); it prints the
//! client's success rate and latency in both runs, the node's peak RSS, and
//! what each attacker saw, and fails unless the client got 100 %. The node
//! is killed (and the attack stopped) past `--max-rss-mib` (default 8192).
//! `bench cluster` starts N nodes (default 64) spread over P worker
//! processes (this executable again, `bench cluster-worker`, hidden) and
//! measures convergence, a routing check, memory per node, idle CPU and
//! how long a killed node stays in the views.

#[path = "mpreg/bench/mod.rs"]
mod bench;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};
use mpreg::{Client, ClusterView, Command, Config, FunctionInfo, Node, NodeStatus, Request};
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(
    name = "mpreg",
    version,
    about = "Run functions on data anywhere in a cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// How to reach a node.
#[derive(Debug, ClapArgs)]
struct ConnectArgs {
    /// The node's URL, e.g. ws://127.0.0.1:7773 (wss:// needs --tls-ca).
    /// Several, comma-separated, connect to the first that answers.
    url: String,
    /// Client-side deadline for each request, in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// A client token, for nodes that require one.
    #[arg(long, env = "MPREG_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM file of the CA certificates to trust for wss:// URLs.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a node until SIGINT or SIGTERM.
    Server(ServerArgs),
    /// Send requests to a node.
    Client {
        #[command(flatten)]
        to: ConnectArgs,
        #[command(subcommand)]
        action: ClientCmd,
    },
    /// Show the cluster as a node sees it: its peers, their status and load,
    /// and the functions (with datasets) each offers.
    Cluster {
        #[command(flatten)]
        to: ConnectArgs,
        /// Print the node's view as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure throughput and latency of a node (`bench URL`), run the
    /// whole benchmark suite (`bench suite`), a node under attack
    /// (`bench hostile`), or a cluster of many nodes (`bench cluster`).
    Bench(BenchArgs),
}

#[derive(Debug, ClapArgs)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    #[command(subcommand)]
    suite: Option<BenchCmd>,
    /// The server to drive, e.g. ws://127.0.0.1:7773
    url: Option<String>,
    /// WebSocket connections.
    #[arg(long, short = 'c', default_value_t = 8)]
    connections: usize,
    /// Requests in flight on each connection.
    #[arg(long, short = 'd', default_value_t = 16)]
    inflight: usize,
    /// Seconds measured (after the warm-up).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of warm-up, not measured.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Seconds a request may wait for its reply before it counts as a
    /// timeout.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// The request to send: a JSON list of commands, or an object with
    /// `cmds` (`-` reads standard input). Default: one `echo` of "hi".
    #[arg(long)]
    request: Option<PathBuf>,
    /// Also measure a bare WebSocket JSON server (started in this process)
    /// with the same load, and print the ratios.
    #[arg(long)]
    baseline: bool,
    /// Print one JSON line instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Measure every target of BENCHMARKS.md in one run and print one table.
    Suite {
        /// Print one JSON line instead of a table.
        #[arg(long)]
        json: bool,
        /// Shorter runs (1 s per load row, fewer samples): a smoke test.
        #[arg(long)]
        quick: bool,
    },
    /// Start a node and measure a well-behaved client on it, alone and then
    /// while hostile neighbours attack it; print the client's success rate
    /// and latency, the node's peak memory, and what each attacker saw.
    /// Fails unless the client got 100 %.
    Hostile {
        /// Seconds of each run (alone, under attack).
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
        /// Kill the node (and stop the attack) when its resident memory
        /// passes this many MiB, to protect the machine.
        #[arg(long, default_value_t = 8192)]
        max_rss_mib: u64,
    },
    /// Start N nodes over P processes and measure convergence, routing,
    /// memory per node, idle CPU and how long a killed node stays.
    ///
    /// The nodes run on loopback in P worker processes (this executable
    /// again). Measured: the time until every node sees every node and
    /// dataset after the last one started, a routing check, memory per node
    /// (RSS beyond each process's baseline), threads and sockets, the
    /// cluster's idle CPU, and the time until a killed node leaves every
    /// view. Fails if the cluster does not converge within --timeout, a
    /// routing check fails, or the killed node stays.
    ///
    /// Open files: each node holds 2 sockets (its TCP listener and its UDP
    /// gossip socket) plus one per link it has open, and a pair of nodes
    /// may be linked; a worker with K nodes may thus need K x (N + 1) open
    /// files. Keep that under the soft limit (`ulimit -n`) with more
    /// --processes, or raise the limit. A worker that cannot start a node
    /// reports why, and the command fails.
    Cluster {
        /// Nodes in the cluster (node i is named n{i}, has dataset d{i},
        /// and joins through n0).
        #[arg(long, default_value_t = 64)]
        nodes: usize,
        /// Worker processes the nodes are spread over, as evenly as
        /// possible.
        #[arg(long, default_value_t = 1)]
        processes: usize,
        /// Seconds each long wait may take: starting, convergence after
        /// the last start, a killed node leaving every view. On timeout the
        /// figures reached so far are printed.
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
        /// Seconds the converged cluster is left idle while its CPU time
        /// is measured (0 skips it).
        #[arg(long, default_value_t = 10.0)]
        idle_secs: f64,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// One worker process of `bench cluster` (internal): starts its nodes,
    /// then takes orders on stdin and reports on stdout, one JSON object
    /// per line.
    #[command(hide = true)]
    ClusterWorker {
        /// Index of its first node.
        #[arg(long)]
        first: usize,
        /// How many nodes it starts.
        #[arg(long)]
        count: usize,
        /// Nodes in the whole cluster.
        #[arg(long)]
        total: usize,
        /// Worker processes in the run.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// The seed node's URL (none: this worker starts node 0, the seed).
        #[arg(long)]
        seed: Option<String>,
        /// Exit after this many seconds whatever happens.
        #[arg(long)]
        lifetime_secs: u64,
    },
}

#[derive(Debug, ClapArgs)]
struct ServerArgs {
    /// Config file: YAML (.yaml/.yml, including the original project's
    /// files) or TOML. Environment variables override it (one per setting,
    /// MPREG_ and the setting in capitals: MPREG_LISTEN,
    /// MPREG_REQUEST_TIMEOUT_MS, MPREG_TLS_CERT, ...), and flags override
    /// both.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The node's name.
    #[arg(long)]
    name: Option<String>,
    /// Address to listen on, HOST:PORT (port 0 picks a free one).
    #[arg(long)]
    listen: Option<String>,
    /// A peer to join (repeatable).
    #[arg(long = "peer", value_name = "URL")]
    peers: Vec<String>,
    /// A dataset this node has (repeatable).
    #[arg(long = "dataset", value_name = "D")]
    datasets: Vec<String>,
    /// Serve debug.sleep, debug.fail and debug.panic.
    #[arg(long)]
    diagnostics: bool,
}

#[derive(Debug, Subcommand)]
enum ClientCmd {
    /// Call one function and print its result as JSON.
    Call {
        /// The function.
        fun: String,
        /// Positional arguments, each JSON (a word that is not JSON is
        /// taken as a string).
        #[arg(value_name = "JSON-ARG", allow_hyphen_values = true)]
        args: Vec<String>,
        /// A dataset the running node must have (repeatable).
        #[arg(long = "dataset", value_name = "D")]
        datasets: Vec<String>,
    },
    /// Send the commands in FILE (a JSON list of commands, or a request
    /// object with `cmds`) and print the results.
    Request {
        /// The file; `-` reads standard input.
        file: PathBuf,
        /// Print each command's result as soon as it exists, one JSON line
        /// `{"name": .., "value": ..}` each, before the final results.
        #[arg(long)]
        stream: bool,
    },
    /// Run the five reference examples and print each request and result.
    Demo,
    /// Describe the functions of the cluster (or one): parameters, return
    /// type, doc, and the nodes (with datasets) that run it.
    Describe {
        /// Only this function.
        fun: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The benchmarks start nodes in process: keep their logs out of the way.
    let default_filter = match cli.command {
        Cmd::Bench(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Cmd::Server(args) => server(args).await,
            Cmd::Client { to, action } => client(&to, action).await,
            Cmd::Cluster { to, json } => cluster(&to, json).await,
            Cmd::Bench(args) => bench_command(args).await,
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            // Show each cause once: many errors already include theirs.
            let mut shown = e.to_string();
            let mut source = std::error::Error::source(&*e);
            while let Some(s) = source {
                let cause = s.to_string();
                if !shown.contains(&cause) {
                    eprintln!("  caused by: {cause}");
                    shown.push_str(&cause);
                }
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

async fn server(args: ServerArgs) -> CliResult {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    // File, then environment (MPREG_NAME, MPREG_LISTEN, ...), then flags.
    config.apply_env()?;
    if let Some(name) = args.name {
        config.name = Some(name);
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    config.peers.extend(args.peers);
    config.datasets.extend(args.datasets);
    config.diagnostics |= args.diagnostics;

    let node = Node::builder().config(config).start().await?;
    // The one line on stdout: scripts and tests wait for it.
    match node.url() {
        Some(url) => println!("listening on {url}"),
        None => println!("started dial-out only (not listening)"),
    }
    mpreg::shutdown_signal().await;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

async fn bench_command(args: BenchArgs) -> CliResult {
    let seconds = |what: &str, s: f64| {
        Duration::try_from_secs_f64(s).map_err(|_| format!("--{what} must be a number of seconds"))
    };
    match args.suite {
        Some(BenchCmd::Suite { json, quick }) => return bench::suite(json, quick).await,
        Some(BenchCmd::Hostile {
            secs,
            json,
            max_rss_mib,
        }) => {
            return bench::hostile(bench::HostileOptions {
                duration: seconds("secs", secs)?,
                json,
                max_rss_mib,
            })
            .await;
        }
        Some(BenchCmd::Cluster {
            nodes,
            processes,
            timeout,
            idle_secs,
            json,
        }) => {
            return bench::cluster(bench::ClusterOptions {
                nodes,
                processes,
                timeout: seconds("timeout", timeout)?,
                idle: seconds("idle-secs", idle_secs)?,
                json,
            })
            .await;
        }
        Some(BenchCmd::ClusterWorker {
            first,
            count,
            total,
            workers,
            seed,
            lifetime_secs,
        }) => {
            return bench::cluster_worker(bench::WorkerOptions {
                first,
                count,
                total,
                workers,
                seed,
                lifetime: Duration::from_secs(lifetime_secs),
            })
            .await;
        }
        None => {}
    }
    let shape = bench::Shape {
        connections: args.connections,
        inflight: args.inflight,
        duration: seconds("duration", args.duration)?,
        warmup: seconds("warmup", args.warmup)?,
        timeout: seconds("timeout", args.timeout)?,
    };
    bench::load_command(bench::LoadOptions {
        url: args.url,
        shape,
        request: args.request,
        baseline: args.baseline,
        json: args.json,
    })
    .await
}

async fn connect(to: &ConnectArgs) -> Result<Client, Box<dyn std::error::Error>> {
    let mut builder = Client::builder();
    if let Some(ms) = to.timeout_ms {
        builder = builder.timeout(Duration::from_millis(ms));
    }
    if let Some(token) = &to.token {
        builder = builder.token(token);
    }
    if let Some(path) = &to.tls_ca {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        builder = builder.tls_ca_pem(pem);
    }
    let seeds: Vec<&str> = to
        .url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    Ok(match seeds[..] {
        [one] => builder.connect(one).await?,
        _ => builder.connect_any(seeds).await?,
    })
}

async fn client(to: &ConnectArgs, action: ClientCmd) -> CliResult {
    let client = connect(to).await?;
    match action {
        ClientCmd::Call {
            fun,
            args,
            datasets,
        } => {
            let command = Command::new("result", fun)
                .args(args.iter().map(|a| parse_arg(a)))
                .datasets(datasets);
            let result: Value = client.call_command(command).await?;
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        ClientCmd::Request { file, stream } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?
            };
            let request = parse_request_file(&text)?;
            let results = if stream {
                let mut events = client.stream(request).await?;
                let mut done = None;
                // Bounded: the stream ends after its final reply or error.
                while let Some(event) = events.next().await {
                    match event? {
                        mpreg::Event::Progress(p) => {
                            let (name, value) = p.into_parts();
                            let line = serde_json::json!({ "name": name, "value": value });
                            println!("{line}");
                        }
                        mpreg::Event::Done(results) => done = Some(results),
                        _ => {}
                    }
                }
                done.ok_or("the stream ended without results")?
            } else {
                client.send(request).await?
            };
            println!("{}", serde_json::to_string_pretty(&results.into_map())?);
        }
        ClientCmd::Describe { fun } => {
            let functions: Vec<Value> = client.call("mpreg.functions", ()).await?;
            let shown: Vec<&Value> = functions
                .iter()
                .filter(|f| fun.as_deref().is_none_or(|name| f["name"] == name))
                .collect();
            if let (Some(name), true) = (&fun, shown.is_empty()) {
                return Err(format!("no function '{name}' in the cluster").into());
            }
            for f in shown {
                print!("{}", describe(f));
            }
        }
        ClientCmd::Demo => {
            for (i, example) in mpreg::demo::reference_examples().into_iter().enumerate() {
                let shown = serde_json::json!({ "cmds": example.request.cmds });
                println!("request {}: {}", i + 1, serde_json::to_string(&shown)?);
                let results = Value::Object(client.send(example.request).await?.into_map());
                println!("result  {}: {}", i + 1, serde_json::to_string(&results)?);
                if results != example.expected {
                    return Err(format!("expected {}", example.expected).into());
                }
            }
        }
    }
    Ok(())
}

async fn cluster(to: &ConnectArgs, json: bool) -> CliResult {
    let client = connect(to).await?;
    let view: Value = client.call("mpreg.cluster", ()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        let view: ClusterView = serde_json::from_value(view)
            .map_err(|e| format!("unexpected answer from mpreg.cluster: {e}"))?;
        print!("{}", cluster_table(&view));
    }
    Ok(())
}

/// The `mpreg.cluster` view as a table: a title line naming the node that
/// answered, a header, then one row per node (columns padded to their
/// widest cell; the last column, functions, is not padded).
fn cluster_table(view: &ClusterView) -> String {
    const HEADER: [&str; 6] = ["NAME", "ADDR", "STATUS", "LOAD", "JOBS SENT", "FUNCTIONS"];
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    let mut rows: Vec<[String; 6]> = vec![HEADER.map(str::to_owned)];
    for node in &view.nodes {
        let status = match node.status {
            NodeStatus::This => "self",
            NodeStatus::Up => "up",
            NodeStatus::Leaf => "leaf",
            _ => "?",
        };
        rows.push([
            node.name.clone(),
            or_dash(node.addr.map(|a| a.to_string())),
            status.to_owned(),
            node.load.to_string(),
            or_dash(node.jobs_sent.map(|n| n.to_string())),
            functions_cell(&node.functions),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = format!(
        "cluster as seen by {} ({} nodes)\n",
        view.self_name,
        view.nodes.len()
    );
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `fun` or `fun[d1,d2]` for each function, sorted, without repeats.
fn functions_cell(functions: &[FunctionInfo]) -> String {
    let mut shown: Vec<String> = functions
        .iter()
        .map(|f| {
            if f.datasets.is_empty() {
                f.fun.clone()
            } else {
                let datasets: Vec<&str> = f.datasets.iter().map(String::as_str).collect();
                format!("{}[{}]", f.fun, datasets.join(","))
            }
        })
        .collect();
    shown.sort();
    shown.dedup();
    if shown.is_empty() {
        "-".to_owned()
    } else {
        shown.join(", ")
    }
}

/// One function, described for people: its signature, its doc, and where
/// it runs.
fn describe(f: &Value) -> String {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let params: Vec<String> = f["params"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|p| format!("{}: {}", text(&p["name"]), text(&p["type"])))
        .collect();
    let mut out = format!("{}({})", text(&f["name"]), params.join(", "));
    let returns = text(&f["returns"]);
    if !returns.is_empty() {
        out.push_str(&format!(" -> {returns}"));
    }
    if f["idempotent"] == true {
        out.push_str("  [idempotent]");
    }
    out.push('\n');
    for line in text(&f["doc"]).lines() {
        out.push_str(&format!("    {line}\n"));
    }
    let nodes: Vec<String> = f["nodes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|n| {
            let datasets: Vec<String> = n["datasets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(text)
                .collect();
            if datasets.is_empty() {
                text(&n["node"])
            } else {
                format!("{} [{}]", text(&n["node"]), datasets.join(", "))
            }
        })
        .collect();
    out.push_str(&format!("    on: {}\n", nodes.join("; ")));
    out
}

/// A command-line argument as JSON, or as a plain string when it is not JSON
/// (so `call echo hello` works without quoting).
fn parse_arg(arg: &str) -> Value {
    serde_json::from_str(arg).unwrap_or_else(|_| Value::String(arg.to_owned()))
}

/// A request file: a JSON list of commands, or an object with `cmds` (and
/// optionally `timeout_ms` and `return_intermediate_results`).
fn parse_request_file(text: &str) -> Result<Request, Box<dyn std::error::Error>> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum File {
        List(Vec<Command>),
        Object {
            cmds: Vec<Command>,
            #[serde(default)]
            timeout_ms: Option<u64>,
            #[serde(default)]
            return_intermediate_results: bool,
        },
    }
    let file: File = serde_json::from_str(text).map_err(|e| {
        format!("request file must be a JSON list of commands or an object with `cmds`: {e}")
    })?;
    Ok(match file {
        File::List(cmds) => cmds.into_iter().collect(),
        File::Object {
            cmds,
            timeout_ms,
            return_intermediate_results,
        } => {
            let mut request: Request = cmds.into_iter().collect();
            if let Some(ms) = timeout_ms {
                request = request.timeout(Duration::from_millis(ms));
            }
            request.return_intermediate_results(return_intermediate_results)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cluster_table_has_a_row_per_node_with_sorted_functions() {
        let view = json!({
            "self": "A",
            "nodes": [
                {"name": "A", "addr": "127.0.0.1:7773", "status": "self", "generation": 1,
                 "load": 0, "gossip": null,
                 "functions": [{"fun": "mpreg.whoami", "datasets": [], "idempotent": true},
                               {"fun": "echo", "datasets": [], "idempotent": true}]},
                {"name": "leaf-1", "addr": null, "status": "leaf", "generation": 2,
                 "load": 3, "jobs_sent": 12,
                 "functions": [{"fun": "predict", "datasets": ["model-a", "model-b"], "idempotent": false},
                               {"fun": "echo", "datasets": ["model-a", "model-b"], "idempotent": true}]},
            ]
        });
        let view: ClusterView = serde_json::from_value(view).expect("a view");
        let table = cluster_table(&view);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "cluster as seen by A (2 nodes)");
        assert_eq!(
            lines[1],
            "NAME    ADDR            STATUS  LOAD  JOBS SENT  FUNCTIONS"
        );
        assert_eq!(
            lines[2],
            "A       127.0.0.1:7773  self    0     -          echo, mpreg.whoami"
        );
        assert_eq!(
            lines[3],
            "leaf-1  -               leaf    3     12         echo[model-a,model-b], predict[model-a,model-b]"
        );
        assert_eq!(lines.len(), 4);
        assert!(serde_json::from_value::<ClusterView>(json!({"oops": 1})).is_err());
    }
}
