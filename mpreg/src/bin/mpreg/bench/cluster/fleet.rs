//! The parent's side of the workers: spawning them (this executable with
//! the hidden `bench cluster-worker`), writing orders to their stdin, and
//! reading their notes (each timestamped on receipt) and their stderr on
//! threads of their own. Every worker is killed when the [`Fleet`] is
//! dropped, on success and on error alike.

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{ChildStdin, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::wire::{Note, Order};
use super::{BenchResult, Child, node_name};

/// Lines of a worker's stderr kept for the report.
const TAIL_LINES: usize = 5;
/// Characters kept of each such line.
const TAIL_CHARS: usize = 400;
/// Unreadable stdout lines kept for the report.
const ODD_LINES: usize = 5;

/// A line a worker wrote on stdout, or its end.
#[derive(Debug)]
pub(super) enum Line {
    /// A note.
    Note(Note),
    /// A line that is not a note (kept for the report).
    Unreadable(String),
    /// Stdout closed: the worker exited (or closed it).
    Closed,
}

/// A line from worker `worker`, received at `at` (the parent's clock).
#[derive(Debug)]
pub(super) struct Arrival {
    /// The worker's index.
    pub(super) worker: usize,
    /// When the parent read it.
    pub(super) at: Instant,
    /// What it was.
    pub(super) line: Line,
}

/// The end of a worker's stderr: how many lines, and the last few.
#[derive(Debug, Default)]
pub(super) struct Tail {
    /// Lines written so far.
    pub(super) count: u64,
    /// The last [`TAIL_LINES`], each cut to [`TAIL_CHARS`].
    pub(super) last: VecDeque<String>,
}

/// One worker process.
#[derive(Debug)]
pub(super) struct Worker {
    /// Its first node's index.
    pub(super) first: usize,
    /// Its number of nodes.
    pub(super) count: usize,
    /// Its process id.
    pub(super) pid: u32,
    /// Orders go here.
    stdin: ChildStdin,
    /// Killed (and reaped) when dropped.
    child: Child,
    /// Its stderr's end.
    pub(super) tail: Arc<Mutex<Tail>>,
}

impl Worker {
    /// `n{first}..n{last}` (or the one node).
    pub(super) fn nodes_text(&self) -> String {
        match self.count {
            0 => "no nodes".into(),
            1 => node_name(self.first),
            _ => format!(
                "{}..{}",
                node_name(self.first),
                node_name(self.first + self.count - 1)
            ),
        }
    }

    /// The last lines of its stderr, for an error message.
    fn tail_text(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        if tail.last.is_empty() {
            "nothing on stderr".into()
        } else {
            let lines: Vec<&str> = tail.last.iter().map(String::as_str).collect();
            format!("last lines of its stderr:\n    {}", lines.join("\n    "))
        }
    }
}

/// The workers of one run.
#[derive(Debug)]
pub(super) struct Fleet {
    /// Spawned so far, by index.
    pub(super) workers: Vec<Worker>,
    /// Every worker's lines.
    arrivals: mpsc::UnboundedReceiver<Arrival>,
    /// Cloned for each reader thread.
    sender: mpsc::UnboundedSender<Arrival>,
    /// This executable.
    exe: PathBuf,
    /// Nodes in the whole cluster.
    total: usize,
    /// Worker processes in the run.
    processes: usize,
    /// How long a worker may live.
    lifetime: Duration,
    /// The first few lines on workers' stdout that were not notes.
    pub(super) unreadable: Vec<String>,
}

impl Fleet {
    /// A fleet of no workers yet, for a cluster of `total` nodes over
    /// `processes` workers, which exit by themselves after `lifetime`.
    pub(super) fn new(total: usize, processes: usize, lifetime: Duration) -> BenchResult<Self> {
        let (sender, arrivals) = mpsc::unbounded_channel();
        Ok(Self {
            workers: Vec::new(),
            arrivals,
            sender,
            exe: std::env::current_exe()?,
            total,
            processes,
            lifetime,
            unreadable: Vec::new(),
        })
    }

    /// Spawns the next worker, with nodes `first..first + count`, joining
    /// through `seed` (none for the worker that starts the seed).
    pub(super) fn spawn(
        &mut self,
        first: usize,
        count: usize,
        seed: Option<&str>,
    ) -> BenchResult<()> {
        let index = self.workers.len();
        let mut command = std::process::Command::new(&self.exe);
        command.args([
            "bench".to_owned(),
            "cluster-worker".to_owned(),
            "--first".to_owned(),
            first.to_string(),
            "--count".to_owned(),
            count.to_string(),
            "--total".to_owned(),
            self.total.to_string(),
            "--workers".to_owned(),
            self.processes.to_string(),
            "--lifetime-secs".to_owned(),
            self.lifetime.as_secs().to_string(),
        ]);
        if let Some(seed) = seed {
            command.args(["--seed", seed]);
        }
        // Plain text on stderr: its last lines go into the report.
        let mut child = command
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start worker {index}: {e}"))?;
        let pid = child.id();
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        // From here on, the worker is killed when dropped.
        let child = Child(child);
        let (Some(stdin), Some(stdout), Some(stderr)) = (stdin, stdout, stderr) else {
            return Err(format!("worker {index}: no pipes").into());
        };
        let tail = Arc::new(Mutex::new(Tail::default()));
        let sender = self.sender.clone();
        // Both threads end at end of file, when the worker exits (at the
        // latest when the fleet kills it).
        std::thread::Builder::new()
            .name(format!("worker-{index}-out"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let line = match serde_json::from_str(&line) {
                        Ok(note) => Line::Note(note),
                        Err(_) => Line::Unreadable(line),
                    };
                    let arrival = Arrival {
                        worker: index,
                        at: Instant::now(),
                        line,
                    };
                    if sender.send(arrival).is_err() {
                        return;
                    }
                }
                let _ = sender.send(Arrival {
                    worker: index,
                    at: Instant::now(),
                    line: Line::Closed,
                });
            })?;
        let kept = tail.clone();
        std::thread::Builder::new()
            .name(format!("worker-{index}-err"))
            .spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut tail = kept.lock().unwrap_or_else(PoisonError::into_inner);
                    tail.count += 1;
                    if tail.last.len() == TAIL_LINES {
                        tail.last.pop_front();
                    }
                    tail.last.push_back(line.chars().take(TAIL_CHARS).collect());
                }
            })?;
        self.workers.push(Worker {
            first,
            count,
            pid,
            stdin,
            child,
            tail,
        });
        Ok(())
    }

    /// Sends `order` to worker `index`.
    pub(super) fn send(&mut self, index: usize, order: &Order) -> BenchResult<()> {
        let line = serde_json::to_string(order)?;
        let worker = self
            .workers
            .get_mut(index)
            .ok_or_else(|| format!("no worker {index}"))?;
        let written = writeln!(worker.stdin, "{line}").and_then(|()| worker.stdin.flush());
        written.map_err(|e| {
            let status = match worker.child.0.try_wait() {
                Ok(Some(status)) => format!("exit: {status}"),
                _ => "still running".into(),
            };
            format!(
                "worker {index} ({}) cannot take orders: {e} ({status}); {}",
                worker.nodes_text(),
                worker.tail_text()
            )
            .into()
        })
    }

    /// Sends `order` to every worker.
    pub(super) fn send_all(&mut self, order: &Order) -> BenchResult<()> {
        for index in 0..self.workers.len() {
            self.send(index, order)?;
        }
        Ok(())
    }

    /// The next note of any worker, or `None` once `deadline` has passed.
    /// A worker's `Error` note, or its exit, is an error (its message and
    /// the end of its stderr); unreadable lines are kept and skipped.
    pub(super) async fn next(
        &mut self,
        deadline: Instant,
    ) -> BenchResult<Option<(usize, Instant, Note)>> {
        // Bounded by the deadline, whatever the workers write.
        loop {
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let until = tokio::time::Instant::from_std(deadline);
            let arrival = match tokio::time::timeout_at(until, self.arrivals.recv()).await {
                Err(_) => return Ok(None),
                Ok(None) => return Err("every worker's output is closed".into()),
                Ok(Some(arrival)) => arrival,
            };
            let Arrival { worker, at, line } = arrival;
            match line {
                Line::Note(Note::Error { message }) => {
                    let w = self.workers.get(worker);
                    let nodes = w.map(Worker::nodes_text).unwrap_or_default();
                    return Err(format!("worker {worker} ({nodes}) failed: {message}").into());
                }
                Line::Note(note) => return Ok(Some((worker, at, note))),
                Line::Unreadable(text) => {
                    if self.unreadable.len() < ODD_LINES {
                        self.unreadable.push(format!("worker {worker}: {text}"));
                    }
                }
                Line::Closed => return Err(self.exited(worker).await.into()),
            }
        }
    }

    /// Why worker `index` is gone: its exit status (waited for up to a
    /// second) and the end of its stderr.
    async fn exited(&mut self, index: usize) -> String {
        let Some(worker) = self.workers.get_mut(index) else {
            return format!("worker {index} is gone");
        };
        let mut status = None;
        for _ in 0..20 {
            if let Ok(Some(s)) = worker.child.0.try_wait() {
                status = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Its stderr thread may still be reading the last lines.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let status = status.map_or_else(|| "still running".to_owned(), |s| s.to_string());
        format!(
            "worker {index} ({}) closed its output unexpectedly (exit: {status}); {}",
            worker.nodes_text(),
            worker.tail_text()
        )
    }

    /// Tells every worker to quit, and waits up to `grace` for them to
    /// exit; those still running are killed when the fleet is dropped.
    pub(super) async fn quit(&mut self, grace: Duration) {
        for index in 0..self.workers.len() {
            // A worker that cannot take orders is killed anyway.
            let _ = self.send(index, &Order::Quit);
        }
        let deadline = Instant::now() + grace;
        // Bounded by the deadline.
        while Instant::now() < deadline {
            let mut running = 0;
            for w in &mut self.workers {
                running += usize::from(matches!(w.child.0.try_wait(), Ok(None)));
            }
            if running == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
