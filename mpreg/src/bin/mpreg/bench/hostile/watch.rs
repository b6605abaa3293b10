//! The node's memory, sampled every 100 ms on a thread of its own.

use super::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// The node process and what the watcher saw of it.
pub(super) struct Watch {
    pub(super) child: Mutex<Child>,
    pub(super) pid: u32,
    pub(super) max_rss_kib: u64,
    /// Highest VmRSS sampled, KiB.
    pub(super) peak_rss_kib: AtomicU64,
    /// Last VmHWM read, KiB (kept when the process is gone).
    pub(super) hwm_kib: AtomicU64,
    /// The current run and when it started, for the messages.
    pub(super) phase: Mutex<(&'static str, Instant)>,
    /// Why the node is gone, when it is.
    pub(super) ended: Mutex<Option<String>>,
    /// Cancelled when the node is gone: the attack stops.
    pub(super) stop: CancellationToken,
    /// Set when the run is over: the watcher stops.
    pub(super) done: AtomicBool,
}

impl Watch {
    pub(super) fn phase(&self, name: &'static str) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = (name, Instant::now());
    }

    pub(super) fn end(&self, why: String) {
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(why);
        self.stop.cancel();
    }

    pub(super) fn ended(&self) -> Option<String> {
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads VmHWM now (the last value seen when the node is gone), MiB.
    pub(super) fn hwm_mib(&self) -> f64 {
        if let Ok(mib) = status_mib(self.pid, "VmHWM")
            && self.ended().is_none()
        {
            return mib;
        }
        self.hwm_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }

    /// One sample; false once the node is gone.
    pub(super) fn sample(&self) -> bool {
        let exited = self
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .try_wait();
        if let Ok(Some(status)) = exited {
            self.end(format!(
                "the node exited by itself ({status}) {}",
                self.when()
            ));
            return false;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.pid)) else {
            return true;
        };
        if let Some(hwm) = status_kib(&status, "VmHWM") {
            self.hwm_kib.store(hwm, Ordering::Relaxed);
        }
        let Some(rss) = status_kib(&status, "VmRSS") else {
            return true;
        };
        self.peak_rss_kib.fetch_max(rss, Ordering::Relaxed);
        if rss > self.max_rss_kib {
            let _ = self
                .child
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .0
                .kill();
            self.end(format!(
                "the node's RSS reached {:.0} MiB, past --max-rss-mib {}: it was killed {} and the attack stopped",
                rss as f64 / 1024.0,
                self.max_rss_kib / 1024,
                self.when()
            ));
            return false;
        }
        true
    }

    pub(super) fn when(&self) -> String {
        let (name, at) = *self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        format!("{:.1} s into the {name} run", at.elapsed().as_secs_f64())
    }
}

/// Samples the node every 100 ms on a thread of its own (a busy runtime
/// cannot delay it) until it is gone or `watch.done` is set.
pub(super) fn watch_node(watch: Arc<Watch>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("rss-watch".into())
        .spawn(move || {
            while !watch.done.load(Ordering::Relaxed) && watch.sample() {
                std::thread::sleep(SAMPLE);
            }
        })
}

// ---------------------------------------------------------------------------
// The well-behaved client
// ---------------------------------------------------------------------------
