//! `mpreg bench hostile`: a well-behaved client on a node left alone, then
//! on the same node while hostile neighbours try to exhaust it or break it
//! for others.
//!
//! One `mpreg server` process (this executable) runs on a free loopback
//! port with a client token and a cluster secret. The well-behaved client
//! (one raw WebSocket connection with the token in its upgrade) sends
//! sequential `echo` requests for N seconds, twice: once with the node to
//! itself (idle), once while every attacker below runs at once (attack).
//! Every attacker connects only to the node's loopback address, is bounded
//! in count and time, stops by itself at the end of the attack run, and
//! records what happened to it: the error codes it received, the close
//! codes and reasons, the HTTP status of refused upgrades.
//!
//! - doubling references: a 1.2 KB request `a = echo("x" * 100)`, then 22
//!   levels `l(i) = echos(l(i-1), l(i-1))` (2^22 copies of `a` when
//!   nothing stops it), sent over and over with a token;
//! - silent connections: about 2,000 upgrades without a token that never
//!   send a message (fewer when the open-files limit is low);
//! - a `stream: true` request with a 1 MiB `u` and 1,500 commands (each
//!   progress message carries the `u`), from a client that never reads;
//! - four 60 MiB first messages from clients without a token;
//! - a `peer-hello` with no proof, over and over (every other one with a
//!   challenge nonce, as a real dialer sends), recording whether any answer
//!   reveals the node's name;
//! - 200 pipelined 1 MiB `echo` requests on a connection that never reads;
//! - a ping flood (2 million small pings) on a connection that never reads;
//! - a request whose argument nests 10,000 levels deep, over and over
//!   (expected: `bad_request` carrying its `u`).
//!
//! The node's memory is sampled every 100 ms (`VmRSS`, `VmHWM` from
//! `/proc/PID/status`); past `--max-rss-mib` the node is killed and the
//! attack stops, to protect the machine. The report: the well-behaved
//! client's success rate (the command fails unless it is 100 % in both
//! runs) and its p50, p99 and max idle and under attack, the node's peak
//! RSS in both runs, and one line per attacker.

use super::*;
use serde_json::json;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

mod attack;
mod client;
mod watch;

use self::attack::*;
use self::client::*;
use self::watch::*;

/// The client token the node accepts.
pub(super) const TOKEN: &str = "hostile-bench-token";
/// The node's cluster secret (no attacker knows it).
pub(super) const SECRET: &str = "hostile-bench-cluster-secret";
/// The node's name: distinctive, so that an answer revealing it is seen.
pub(super) const NODE_NAME: &str = "hostile-bench-node-5c1e";

/// How long the well-behaved client (and a repeated attacker) waits for
/// one reply.
pub(super) const REPLY_WAIT: Duration = Duration::from_secs(10);
/// How long an upgrade may take.
pub(super) const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How long a connection that never read is read at the end of the attack,
/// to see what the node left for it.
pub(super) const DRAIN: Duration = Duration::from_secs(2);
/// Every attacker has finished this long after the end of the attack run
/// (else it is aborted and says so).
pub(super) const GRACE: Duration = Duration::from_secs(20);
/// How often the node's memory is sampled.
pub(super) const SAMPLE: Duration = Duration::from_millis(100);

pub(super) const DOUBLING_LEVELS: usize = 22;
pub(super) const SILENT_CONNECTIONS: usize = 2000;
pub(super) const STREAM_U_BYTES: usize = 1 << 20;
pub(super) const STREAM_COMMANDS: usize = 1500;
pub(super) const BIG_FIRST_BYTES: usize = 60 << 20;
pub(super) const BIG_FIRST_CLIENTS: usize = 4;
/// How long after the end of the run a huge first message may still be
/// sent.
pub(super) const BIG_FIRST_OVERTIME: Duration = Duration::from_secs(5);
pub(super) const PIPELINED: usize = 200;
pub(super) const PIPELINED_BYTES: usize = 1 << 20;
pub(super) const PINGS: u64 = 2_000_000;
pub(super) const NESTING: usize = 10_000;

/// Options of `mpreg bench hostile`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostileOptions {
    /// Length of each run (idle, attack).
    pub(crate) duration: Duration,
    pub(crate) json: bool,
    /// The node is killed (and the attack stopped) past this RSS.
    pub(crate) max_rss_mib: u64,
}

// ---------------------------------------------------------------------------
// The requests (pure)
// ---------------------------------------------------------------------------

/// `mpreg bench hostile`.
pub(crate) async fn hostile(options: HostileOptions) -> BenchResult<()> {
    let secs = options.duration;
    if secs.is_zero() {
        return Err("--secs must be more than 0".into());
    }
    let progress = !options.json || std::io::IsTerminal::is_terminal(&std::io::stderr());
    let say = |what: &str| {
        if progress {
            eprint!("\r{:79}\r{what}", "");
        }
    };
    let port = free_port()?;
    let url = format!("ws://127.0.0.1:{port}");
    let child = spawn_server_with(
        port,
        &[
            ("MPREG_NAME", NODE_NAME),
            ("MPREG_CLIENT_TOKENS", TOKEN),
            ("MPREG_CLUSTER_SECRET", SECRET),
        ],
    )?;
    let pid = child.0.id();
    let stop = CancellationToken::new();
    let watch = Arc::new(Watch {
        child: Mutex::new(child),
        pid,
        max_rss_kib: options.max_rss_mib.saturating_mul(1024),
        peak_rss_kib: AtomicU64::new(0),
        hwm_kib: AtomicU64::new(0),
        phase: Mutex::new(("start", Instant::now())),
        ended: Mutex::new(None),
        stop: stop.clone(),
        done: AtomicBool::new(false),
    });
    // From here on, the node is killed when `watch` is dropped.
    let probe = until_accepting(&url, Duration::from_secs(10)).await?;
    drop(probe);
    let watcher = watch_node(watch.clone())?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Idle.
    say(&format!("idle run ({:.0} s)...", secs.as_secs_f64()));
    watch.phase("idle");
    let (client, connected) = client_thread(url.clone(), secs, stop.clone())?;
    let until = connected
        .await
        .map_err(|_| "the well-behaved client stopped before it started")?;
    let idle = join_client(client, until).await?;
    let idle_hwm = watch.hwm_mib();
    let idle_peak = watch.peak_rss_kib.swap(0, Ordering::Relaxed) as f64 / 1024.0;

    // Under attack: the client connects first, then every attacker starts.
    say(&format!("attack run ({:.0} s)...", secs.as_secs_f64()));
    watch.phase("attack");
    let (client, connected) = client_thread(url.clone(), secs, stop.clone())?;
    let until = connected
        .await
        .map_err(|_| "the well-behaved client stopped before it started")?;
    let ctx = Arc::new(Ctx {
        url: url.clone(),
        until,
        stop: stop.clone(),
    });
    let started = start_attackers(&ctx);
    let attacked = join_client(client, until).await;
    say("waiting for the attackers to stop...");
    let hard = tokio::time::Instant::from_std(ctx.until + GRACE);
    let mut attackers = Vec::with_capacity(started.len());
    for (name, what, mut handle) in started {
        let tally = match tokio::time::timeout_at(hard, &mut handle).await {
            Ok(Ok(tally)) => tally,
            Ok(Err(e)) => Tally::failed(format!("attacker failed: {e}")),
            Err(_) => {
                handle.abort();
                Tally::failed(format!(
                    "did not stop within {} s of the end: aborted",
                    GRACE.as_secs()
                ))
            }
        };
        attackers.push(Attacker { name, what, tally });
    }
    let attacked = attacked?;
    let attack_hwm = watch.hwm_mib();
    let attack_peak = watch.peak_rss_kib.load(Ordering::Relaxed) as f64 / 1024.0;

    // After: does the node still answer, and what does it hold?
    say("after the attack...");
    let mut after_ms = None;
    let mut after_error = None;
    let mut after_rss = None;
    if watch.ended().is_none() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        after_rss = rss_mib(pid).ok();
        let at = Instant::now();
        match open(&url, Some(TOKEN), client_config()).await {
            Ok(mut ws) => match echo_once(&mut ws, &Template::echo(), 1).await {
                Ok(()) => after_ms = Some(at.elapsed().as_secs_f64() * 1e3),
                Err((why, _)) => after_error = Some(why),
            },
            Err(e) => after_error = Some(e),
        }
    } else {
        after_error = Some("the node is gone".into());
    }
    let ended = watch.ended();
    watch.done.store(true, Ordering::Relaxed);
    // Within one sample.
    let _ = tokio::task::spawn_blocking(move || watcher.join()).await;
    // Kills the node (the last reference to `watch`).
    drop(watch);
    say("");

    let ok = ended.is_none() && success_pct(&idle) >= 100.0 && success_pct(&attacked) >= 100.0;
    let q = |r: &Report, q: f64| r.quantile_us(q);
    let max = |r: &Report| {
        if r.latency.is_empty() {
            0
        } else {
            r.latency.max()
        }
    };
    let ratios = [
        ratio(q(&attacked, 0.5) as f64, q(&idle, 0.5) as f64),
        ratio(q(&attacked, 0.99) as f64, q(&idle, 0.99) as f64),
        ratio(max(&attacked) as f64, max(&idle) as f64),
    ];

    if options.json {
        let client = |r: &Report| {
            let mut v = r.json();
            v["success_pct"] = json!(round3(success_pct(r)));
            v
        };
        let out = json!({
            "secs": secs.as_secs_f64(),
            "node": {
                "url": url,
                "pid": pid,
                "peak_rss_mib": {"idle": round3(idle_hwm), "attack": round3(attack_hwm)},
                "sampled_peak_rss_mib": {"idle": round3(idle_peak), "attack": round3(attack_peak)},
                "rss_after_attack_mib": after_rss.map(round3),
                "answers_after_attack": after_ms.is_some(),
                "after_attack_ms": after_ms.map(round3),
                "after_attack_error": after_error,
                "stopped": ended,
                "max_rss_mib": options.max_rss_mib,
            },
            "idle": client(&idle),
            "attack": client(&attacked),
            "ratio": {"p50": finite(ratios[0]), "p99": finite(ratios[1]), "max": finite(ratios[2])},
            "attackers": attackers.iter().map(|a| json!({
                "name": a.name,
                "what": a.what,
                "sent": a.tally.sent,
                "seen": a.tally.seen,
                "notes": a.tally.notes,
            })).collect::<Vec<_>>(),
            "ok": ok,
        });
        println!("{out}");
    } else {
        println!(
            "hostile neighbours: node {url} (pid {pid}), {:.1} s alone, then {:.1} s under attack",
            secs.as_secs_f64(),
            secs.as_secs_f64()
        );
        println!();
        println!("well-behaved client: sequential echo on one connection with a token");
        let row = |name: &str, r: &Report| {
            vec![
                name.to_owned(),
                thousands(r.sent),
                thousands(r.ok),
                format!("{:.2} %", success_pct(r)),
                micros(q(r, 0.5)),
                micros(q(r, 0.99)),
                micros(max(r)),
            ]
        };
        let rows = vec![
            row("idle", &idle),
            row("under attack", &attacked),
            vec![
                "attack / idle".to_owned(),
                String::new(),
                String::new(),
                String::new(),
                fmt_ratio(ratios[0]),
                fmt_ratio(ratios[1]),
                fmt_ratio(ratios[2]),
            ],
        ];
        print!(
            "{}",
            format_table(
                &["", "requests", "ok", "success", "p50", "p99", "max"],
                &rows,
                &[]
            )
        );
        for (name, r) in [("idle", &idle), ("under attack", &attacked)] {
            if let Some(e) = &r.first_error {
                println!(
                    "{name}: {} errors, {} timeouts; first: {e}",
                    r.errors, r.timeouts
                );
            }
        }
        println!();
        let mut node = format!(
            "node peak RSS (VmHWM): {idle_hwm:.1} MiB idle, {attack_hwm:.1} MiB under attack"
        );
        if let Some(rss) = after_rss {
            let _ = write!(node, "; VmRSS 1 s after the attack {rss:.1} MiB");
        }
        println!("{node}");
        match (after_ms, &after_error) {
            (Some(ms), _) => println!("after the attack: a new client's echo took {ms:.1} ms"),
            (None, Some(e)) => println!("after the attack: a new client's echo failed: {e}"),
            (None, None) => {}
        }
        if let Some(why) = &ended {
            println!("STOPPED: {why}");
        }
        println!();
        println!(
            "attackers (all at once for {:.1} s, loopback only)",
            secs.as_secs_f64()
        );
        let rows: Vec<Vec<String>> = attackers
            .iter()
            .map(|a| {
                vec![
                    a.name.to_owned(),
                    a.what.clone(),
                    thousands(a.tally.sent),
                    a.tally.summary(),
                ]
            })
            .collect();
        print!(
            "{}",
            format_table(
                &["attacker", "what", "sent", "what happened"],
                &rows,
                &[true, true, false, true]
            )
        );
    }
    if let Some(why) = ended {
        return Err(why.into());
    }
    if !ok {
        return Err(format!(
            "the well-behaved client did not get 100 % (idle {:.2} %, under attack {:.2} %)",
            success_pct(&idle),
            success_pct(&attacked)
        )
        .into());
    }
    Ok(())
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then(|| round3(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn the_doubling_request_doubles_22_times_in_about_a_kilobyte() {
        let text = doubling_request("h-1", 22);
        assert!((1000..1500).contains(&text.len()), "{} bytes", text.len());
        let v: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(v["u"], "h-1");
        let cmds = v["cmds"].as_array().expect("cmds");
        assert_eq!(cmds.len(), 23);
        assert_eq!(cmds[0]["fun"], "echo");
        assert_eq!(cmds[0]["args"][0].as_str().map(str::len), Some(100));
        assert_eq!(cmds[1]["args"], json!(["a", "a"]));
        assert_eq!(cmds[22]["name"], "l22");
        assert_eq!(cmds[22]["fun"], "echos");
        assert_eq!(cmds[22]["args"], json!(["l21", "l21"]));
    }

    #[test]
    fn the_other_requests_have_the_announced_shape() {
        let deep = nested_request("d-1", 10_000);
        assert!(deep.starts_with("{\"u\":\"d-1\","));
        assert_eq!(deep.matches('[').count(), 10_000 + 2);
        assert_eq!(deep.matches(']').count(), 10_000 + 2);
        // Too deep for a default parser: exactly what the node must refuse.
        assert!(serde_json::from_str::<Value>(&deep).is_err());
        let shallow: Value = serde_json::from_str(&nested_request("d-2", 3)).expect("JSON");
        assert_eq!(shallow["cmds"][0]["args"][0], json!([[[]]]));

        let stream: Value = serde_json::from_str(&stream_request(1 << 20, 1500)).expect("JSON");
        assert_eq!(stream["stream"], true);
        assert_eq!(stream["u"].as_str().map(str::len), Some(1 << 20));
        assert_eq!(stream["cmds"].as_array().map(Vec::len), Some(1500));

        let big = echo_of_size("big", 1 << 20);
        assert!(big.len() > 1 << 20 && big.len() < (1 << 20) + 200);
        let big: Value = serde_json::from_str(&big).expect("JSON");
        assert_eq!(
            big["cmds"][0]["args"][0].as_str().map(str::len),
            Some(1 << 20)
        );

        let hello: Value = serde_json::from_str(&peer_hello(None)).expect("JSON");
        assert_eq!(hello["role"], "peer-hello");
        assert_eq!(hello["body"]["catalog"]["functions"], json!([]));
        assert!(hello["body"].get("nonce").is_none());
        let nonce = nonce_hex(7);
        assert_eq!(nonce.len(), 64);
        assert!(nonce.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(nonce, nonce_hex(8));
        let hello: Value = serde_json::from_str(&peer_hello(Some(&nonce))).expect("JSON");
        assert_eq!(hello["body"]["nonce"], nonce.as_str());
    }

    #[test]
    fn replies_and_tallies_read_as_labels() {
        let err = br#"{"role":"rpc-response","u":"h-1","r":null,"error":{"code":"too_large"}}"#;
        assert_eq!(message_label(err), "error too_large");
        assert_eq!(reply_label(err, "h-1").as_deref(), Some("error too_large"));
        assert_eq!(reply_label(err, "h-2"), None);
        let lost = br#"{"u":null,"r":null,"error":{"code":"bad_request"}}"#;
        assert_eq!(
            reply_label(lost, "h-9").as_deref(),
            Some("error bad_request, u null")
        );
        let later = br#"{"u":"h-1","r":null,"error":{"code":429,"kind":"overloaded"}}"#;
        assert_eq!(message_label(later), "error overloaded");
        let progress = br#"{"role":"rpc-progress","u":"h-1","name":"a","value":1}"#;
        assert_eq!(message_label(progress), "progress");
        assert_eq!(reply_label(progress, "h-1"), None);
        assert_eq!(
            message_label(br#"{"u":1,"r":{"a":"hi"},"error":null}"#),
            "reply ok"
        );
        assert_eq!(
            message_label(br#"{"role":"peer-hello","body":{}}"#),
            "peer-hello message"
        );
        assert_eq!(message_label(b"nope"), "a message that is not JSON");

        let mut t = Tally::default();
        assert_eq!(t.summary(), "nothing");
        t.saw_n("error too_large", 1200);
        t.saw("closed 1008 \"unauthorized\"");
        t.saw_n("never", 0);
        t.notes.push("a note".into());
        assert_eq!(
            t.summary(),
            "error too_large x1,200; closed 1008 \"unauthorized\"; a note"
        );

        assert_eq!(
            status_kib(
                "Name:\tmpreg\nVmHWM:\t  20480 kB\nVmRSS:\t  10240 kB\n",
                "VmRSS"
            ),
            Some(10240)
        );
        assert_eq!(status_kib("VmRSS:\t1 kB\n", "VmHWM"), None);
    }
}
