//! `mpreg bench`: a load generator for any server speaking the mpreg wire
//! protocol, a bare WebSocket baseline server to compare it with, the
//! suite that measures every target of the benchmark table in one run, a
//! hostile-neighbours run (`bench hostile`, see `hostile/`), and a scale
//! run of many nodes over several processes (`bench cluster`, see
//! `cluster.rs`).
//!
//! The load generator opens C raw WebSocket connections (tokio-tungstenite,
//! not `mpreg::Client`, so the client side costs the same for the baseline
//! and for a node) and keeps D requests in flight on each: a writer task
//! sends whenever a slot is free (queued frames written together, one
//! flush), a reader matches each reply to its request by `u` and checks it.
//! Latencies (microseconds) go into an HDR histogram. Replies that complete
//! during the warm-up or the final drain are not counted as throughput;
//! errors, timeouts and replies that match no request are counted over the
//! whole run.

use serde_json::json;

mod baseline;
mod cluster;
mod hostile;
mod load;
mod suite;

pub(crate) use baseline::*;
pub(crate) use cluster::{ClusterOptions, WorkerOptions, cluster, cluster_worker};
pub(crate) use hostile::{HostileOptions, hostile};
pub(crate) use load::*;
pub(crate) use suite::*;

pub(crate) type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

// ---------------------------------------------------------------------------
// `mpreg bench URL`
// ---------------------------------------------------------------------------

/// Options of `mpreg bench URL`.
#[derive(Debug)]
pub(crate) struct LoadOptions {
    pub(crate) url: Option<String>,
    pub(crate) shape: Shape,
    pub(crate) request: Option<std::path::PathBuf>,
    pub(crate) baseline: bool,
    pub(crate) json: bool,
}

/// `mpreg bench [URL] [--baseline] ...`: drives URL (and the in-process
/// baseline, with the same load, when asked) and prints the figures.
pub(crate) async fn load_command(options: LoadOptions) -> BenchResult<()> {
    let template = match &options.request {
        Some(path) => {
            let text = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            };
            Template::parse(&text)?
        }
        None => Template::echo(),
    };
    if options.url.is_none() && !options.baseline {
        return Err("give a URL to benchmark, --baseline, or both".into());
    }
    let shape = options.shape;
    let baseline = if options.baseline {
        let server = Baseline::start().await?;
        let report = run_load(&server.url(), &template, shape, Some("baseline")).await;
        server.stop();
        Some(report?)
    } else {
        None
    };
    let target = match &options.url {
        Some(url) => Some(run_load(url, &template, shape, Some(url)).await?),
        None => None,
    };

    if options.json {
        let mut out = json!({
            "connections": shape.connections,
            "inflight": shape.inflight,
            "duration_s": shape.duration.as_secs_f64(),
            "warmup_s": shape.warmup.as_secs_f64(),
        });
        if let (Some(url), Some(t)) = (&options.url, &target) {
            out["url"] = json!(url);
            out["target"] = t.json();
        }
        if let Some(b) = &baseline {
            out["baseline"] = b.json();
        }
        if let (Some(t), Some(b)) = (&target, &baseline) {
            out["ratio"] = json!({
                "throughput": ratio(t.throughput(), b.throughput()),
                "p50": ratio(t.p50_us(), b.p50_us()),
            });
        }
        println!("{out}");
    } else {
        println!("{}", shape.describe());
        let mut rows = Vec::new();
        if let Some(t) = &target {
            rows.push(cells_with("target", t.cells()));
        }
        if let Some(b) = &baseline {
            rows.push(cells_with("baseline", b.cells()));
        }
        if let (Some(t), Some(b)) = (&target, &baseline) {
            let q = |q: f64| fmt_ratio(ratio(t.quantile_us(q) as f64, b.quantile_us(q) as f64));
            let mut cells = vec![
                "target/baseline".to_owned(),
                fmt_ratio(ratio(t.throughput(), b.throughput())),
            ];
            cells.extend([q(0.5), q(0.9), q(0.99), q(0.999)]);
            rows.push(cells);
        }
        print!("{}", format_table(&REPORT_HEADER, &rows, &[]));
        for (name, report) in [("target", &target), ("baseline", &baseline)] {
            if let Some(Report {
                first_error: Some(e),
                ..
            }) = report
            {
                println!("{name}: first error: {e}");
            }
            if let Some(r) = report
                && r.unmatched > 0
            {
                println!("{name}: {} replies matched no request", r.unmatched);
            }
        }
    }
    if target
        .as_ref()
        .or(baseline.as_ref())
        .is_some_and(|r| r.ok == 0)
    {
        return Err("no request succeeded".into());
    }
    Ok(())
}

fn cells_with(name: &str, cells: Vec<String>) -> Vec<String> {
    let mut row = vec![name.to_owned()];
    row.extend(cells);
    row
}
