//! What the parent and its workers tell each other: one JSON object per
//! line, orders on the worker's stdin, notes on its stdout. The parent
//! timestamps each note on receipt with its own clock; notes carry no
//! times of the worker's clock, only durations the worker measured itself.

use std::collections::BTreeMap;
use std::io::Write as _;

use serde::{Deserialize, Serialize};

use super::BenchResult;

/// What the parent asks of a worker (one line on its stdin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub(crate) enum Order {
    /// Stop watching (convergence or a killed node) and answer with a fresh
    /// [`Note::Progress`] or [`Note::Listing`].
    Stop,
    /// Answer with [`Note::Resources`].
    Measure,
    /// Run these routing checks and answer with [`Note::Routed`].
    Route {
        /// One request each, all at once.
        checks: Vec<Check>,
    },
    /// Watch until none of this worker's nodes lists node `node` in its
    /// view, then answer [`Note::Gone`].
    WatchGone {
        /// The node's name.
        node: String,
    },
    /// Kill node `node` (it must be one of this worker's), as a crash
    /// would, then answer [`Note::Killed`].
    Kill {
        /// The node's name.
        node: String,
    },
    /// Exit.
    Quit,
}

/// One routing check: from node `n{from}`, `echo` and `mpreg.whoami` on
/// dataset `d{to}` (which only node `n{to}` has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Check {
    /// The index of the node the request is sent through.
    pub(crate) from: usize,
    /// The index of the node whose dataset the commands name.
    pub(crate) to: usize,
}

/// What a worker tells the parent (one line on its stdout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum Note {
    /// About to start the first node; the process's resident memory before
    /// any node.
    Starting {
        /// VmRSS before any node, KiB.
        baseline_kib: u64,
    },
    /// The seed node (node 0, worker 0 only) is up at `url`.
    Seed {
        /// The seed's URL.
        url: String,
    },
    /// Every node of the worker is up.
    Started {
        /// How many.
        nodes: usize,
        /// How long starting them took, milliseconds (the worker's clock).
        start_ms: f64,
    },
    /// Where convergence stands in this worker (at least every second while
    /// it is watched, and when the watch stops).
    Progress(Progress),
    /// Every node of the worker sees every node and every dataset.
    Converged(Polling),
    /// The worker's resources, as asked by [`Order::Measure`].
    Resources(Resources),
    /// The outcome of the routing checks of [`Order::Route`].
    Routed {
        /// One per check, in the order given.
        results: Vec<Routed>,
    },
    /// The node of [`Order::Kill`] is dead.
    Killed {
        /// Its name.
        node: String,
    },
    /// How many nodes of the worker still list a killed node (at least
    /// every second while watched, and when the watch stops).
    Listing {
        /// The killed node's name.
        node: String,
        /// Nodes whose view still has it.
        still_listing: usize,
        /// What watching it cost so far.
        polling: Polling,
    },
    /// No node of the worker lists the killed node any more.
    Gone {
        /// Its name.
        node: String,
        /// What watching it cost.
        #[serde(flatten)]
        polling: Polling,
    },
    /// The worker failed and exits (non-zero).
    Error {
        /// What failed.
        message: String,
    },
}

/// What polling the views cost a worker during one watch.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub(crate) struct Polling {
    /// Poll passes made.
    pub(crate) polls: u64,
    /// Views built.
    pub(crate) views: u64,
    /// Time spent building and counting views (`cluster_view()`), in all,
    /// milliseconds: the polling's own cost.
    pub(crate) view_ms: f64,
    /// The longest time between the starts of two passes (the first: from
    /// the start of the watch), milliseconds: what a reported time may be
    /// late by.
    pub(crate) max_gap_ms: f64,
}

/// Where convergence stands among one worker's nodes.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub(crate) struct Progress {
    /// The worker's nodes.
    pub(crate) nodes: usize,
    /// Those that were seen converged (every node, every dataset).
    pub(crate) converged: usize,
    /// Fewest nodes in one of the worker's nodes' views.
    pub(crate) seen_nodes_min: usize,
    /// Most nodes in one of its nodes' views.
    pub(crate) seen_nodes_max: usize,
    /// Fewest datasets `d0..d{N-1}` offered in one view.
    pub(crate) seen_datasets_min: usize,
    /// Most datasets offered in one view.
    pub(crate) seen_datasets_max: usize,
    /// What polling cost so far.
    #[serde(default)]
    pub(crate) polling: Polling,
}

/// A worker's resources, read from `/proc/self`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct Resources {
    /// Nodes alive in the worker.
    pub(crate) nodes: usize,
    /// VmRSS now, KiB.
    pub(crate) rss_kib: u64,
    /// VmRSS before the first node, KiB.
    pub(crate) baseline_kib: u64,
    /// Threads of the process.
    pub(crate) threads: u64,
    /// Open file descriptors.
    pub(crate) fds: usize,
    /// Of them, sockets.
    pub(crate) sockets: usize,
    /// TCP sockets in state ESTABLISHED (both ends count when two nodes
    /// of the worker are linked).
    pub(crate) tcp_established: usize,
    /// TCP sockets listening.
    pub(crate) tcp_listen: usize,
    /// TCP sockets in any other state.
    pub(crate) tcp_other: usize,
    /// Those, by state (`SYN_SENT`, `CLOSE_WAIT`, ...).
    pub(crate) tcp_other_states: BTreeMap<String, usize>,
    /// UDP sockets.
    pub(crate) udp: usize,
    /// Sockets that are neither (Unix, netlink).
    pub(crate) other_sockets: usize,
}

/// The outcome of one routing check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Routed {
    /// The check.
    pub(crate) check: Check,
    /// Whether the echo came back unchanged from node `n{to}`.
    pub(crate) ok: bool,
    /// The node `mpreg.whoami` ran on, when the request succeeded.
    pub(crate) ran_on: Option<String>,
    /// Round trip, milliseconds.
    pub(crate) ms: f64,
    /// Why not, when not ok.
    pub(crate) error: Option<String>,
}

/// Writes `note` as one line on stdout and flushes it: an error when the
/// parent is gone (stdout closed).
pub(crate) fn emit(note: &Note) -> BenchResult<()> {
    let line = serde_json::to_string(note)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn orders_and_notes_are_one_tagged_object_each() {
        let order = Order::Route {
            checks: vec![Check { from: 3, to: 70 }],
        };
        let text = serde_json::to_string(&order).expect("JSON");
        assert_eq!(text, r#"{"cmd":"route","checks":[{"from":3,"to":70}]}"#);
        assert_eq!(serde_json::from_str::<Order>(&text).expect("back"), order);
        assert_eq!(
            serde_json::from_str::<Order>(r#"{"cmd":"quit"}"#).expect("quit"),
            Order::Quit
        );

        let note = Note::Progress(Progress {
            nodes: 4,
            converged: 1,
            seen_nodes_min: 2,
            seen_nodes_max: 64,
            seen_datasets_min: 2,
            seen_datasets_max: 63,
            polling: Polling::default(),
        });
        let value = serde_json::to_value(&note).expect("JSON");
        assert_eq!(value["event"], "progress");
        assert_eq!(value["seen_nodes_max"], 64);
        assert_eq!(serde_json::from_value::<Note>(value).expect("back"), note);
        let error: Note =
            serde_json::from_value(json!({"event": "error", "message": "n7: cannot start"}))
                .expect("error note");
        assert_eq!(
            error,
            Note::Error {
                message: "n7: cannot start".into()
            }
        );
        assert!(serde_json::from_str::<Note>(r#"{"event":"nope"}"#).is_err());
        let gone = Note::Gone {
            node: "n63".into(),
            polling: Polling {
                polls: 3,
                views: 4,
                view_ms: 1.5,
                max_gap_ms: 2.0,
            },
        };
        let value = serde_json::to_value(&gone).expect("JSON");
        assert_eq!(
            value,
            json!({"event": "gone", "node": "n63", "polls": 3, "views": 4, "view_ms": 1.5, "max_gap_ms": 2.0})
        );
        assert_eq!(serde_json::from_value::<Note>(value).expect("back"), gone);
    }
}
