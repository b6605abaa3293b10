//! The `mpreg` command: run a node, or talk to one.
//!
//! ```text
//! mpreg server [--config FILE] [--name N] [--listen HOST:PORT] [--peer URL]...
//!              [--dataset D]... [--diagnostics]
//! mpreg client URL call FUN [JSON-ARG]... [--dataset D]...
//! mpreg client URL request FILE
//! mpreg client URL demo
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};
use mpreg::{Client, Command, Config, Node, Request};
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

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a node until SIGINT or SIGTERM.
    Server(ServerArgs),
    /// Send requests to a node.
    Client {
        /// The node's URL, e.g. ws://127.0.0.1:7773
        url: String,
        /// Client-side deadline for each request, in milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[command(subcommand)]
        action: ClientCmd,
    },
}

#[derive(Debug, ClapArgs)]
struct ServerArgs {
    /// TOML config file; flags override its settings.
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
    },
    /// Run the five reference examples and print each request and result.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
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
            Cmd::Client {
                url,
                timeout_ms,
                action,
            } => client(&url, timeout_ms, action).await,
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = std::error::Error::source(&*e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
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

async fn client(url: &str, timeout_ms: Option<u64>, action: ClientCmd) -> CliResult {
    let mut builder = Client::builder();
    if let Some(ms) = timeout_ms {
        builder = builder.timeout(Duration::from_millis(ms));
    }
    let client = builder.connect(url).await?;
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
        ClientCmd::Request { file } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?
            };
            let request = parse_request_file(&text)?;
            let results = client.send(request).await?;
            println!("{}", serde_json::to_string_pretty(&results.into_map())?);
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
