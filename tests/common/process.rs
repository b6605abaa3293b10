//! A node in a process of its own (the `mpreg server` binary), for tests
//! that measure its memory or send it signals.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::guard;

const BIN: &str = env!("CARGO_BIN_EXE_mpreg");

/// A node in a process of its own (`mpreg server`), for memory figures.
pub(crate) struct Server {
    pub(crate) child: Child,
    /// `ws://127.0.0.1:PORT`.
    pub(crate) url: String,
    /// `127.0.0.1:PORT`.
    pub(crate) addr: String,
}

impl Server {
    /// Starts `mpreg server --diagnostics` on a free loopback port with the
    /// environment `env` (MPREG_* settings).
    pub(crate) async fn start(env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(BIN)
            .env_remove("MPREG_TOKEN")
            .envs(env.iter().copied())
            .args(["server", "--listen", "127.0.0.1:0", "--diagnostics"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn mpreg server");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let line = guard("server start", lines.next_line())
            .await
            .expect("read stdout")
            .expect("a line");
        let url = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let addr = url.trim_start_matches("ws://").to_owned();
        // Keep reading stdout so the server never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server { child, url, addr }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// The node's resident memory now and its peak, in KiB.
    pub(crate) fn memory_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in /proc/PID/status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Sends SIGTERM; waits (with a hang guard) for a clean exit.
    pub(crate) async fn terminate(mut self) {
        let pid = self.pid().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success());
        let exit = guard("server exit after SIGTERM", self.child.wait())
            .await
            .expect("wait");
        assert!(exit.success(), "clean exit on SIGTERM: {exit:?}");
    }
}
