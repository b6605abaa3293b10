//! What the benchmark reads of processes in `/proc` (Linux only): resident
//! memory and threads (`status`), CPU time (`stat`), and the sockets a
//! process owns.
//!
//! Sockets are counted exactly rather than estimated: the inodes of the
//! process's socket descriptors (`/proc/self/fd/*` links reading
//! `socket:[INODE]`) are looked up in `/proc/self/net/tcp`, `tcp6`, `udp`
//! and `udp6`, which list every socket of the network namespace with its
//! state and inode. So ESTABLISHED connections, listeners and other TCP
//! states (closing, TIME_WAIT sockets still held) are told apart, and
//! sockets of other processes are not counted.

use std::collections::HashSet;

use super::wire::Resources;
use super::{BenchResult, status_kib};

/// TCP state ESTABLISHED in `/proc/net/tcp` (hex).
const TCP_ESTABLISHED: u8 = 0x01;
/// TCP state LISTEN in `/proc/net/tcp` (hex).
const TCP_LISTEN: u8 = 0x0A;

/// VmRSS of this process, KiB.
pub(super) fn own_rss_kib() -> BenchResult<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status_kib(&status, "VmRSS").ok_or_else(|| "no VmRSS in /proc/self/status".into())
}

/// This process's resources now. `nodes` and `baseline_kib` are the
/// caller's and copied as they are.
pub(super) fn own_resources(nodes: usize, baseline_kib: u64) -> BenchResult<Resources> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let rss_kib = status_kib(&status, "VmRSS").ok_or("no VmRSS in /proc/self/status")?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or("no Threads in /proc/self/status")?;
    let mut fds = 0;
    let mut inodes = HashSet::new();
    // Bounded: one entry per open descriptor.
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        fds += 1;
        // A descriptor closed since the listing has no link: skipped.
        if let Ok(target) = std::fs::read_link(entry.path())
            && let Some(inode) = socket_inode(&target.to_string_lossy())
        {
            inodes.insert(inode);
        }
    }
    let mut resources = Resources {
        nodes,
        rss_kib,
        baseline_kib,
        threads,
        fds,
        sockets: inodes.len(),
        ..Resources::default()
    };
    let mut found = 0;
    for (table, tcp) in [
        ("tcp", true),
        ("tcp6", true),
        ("udp", false),
        ("udp6", false),
    ] {
        // A table that cannot be read (no IPv6) counts nothing.
        let Ok(text) = std::fs::read_to_string(format!("/proc/self/net/{table}")) else {
            continue;
        };
        for (state, inode) in text.lines().skip(1).filter_map(net_line) {
            if !inodes.contains(&inode) {
                continue;
            }
            found += 1;
            match (tcp, state) {
                (false, _) => resources.udp += 1,
                (true, TCP_ESTABLISHED) => resources.tcp_established += 1,
                (true, TCP_LISTEN) => resources.tcp_listen += 1,
                (true, state) => {
                    resources.tcp_other += 1;
                    *resources
                        .tcp_other_states
                        .entry(tcp_state_name(state))
                        .or_default() += 1;
                }
            }
        }
    }
    resources.other_sockets = inodes.len().saturating_sub(found);
    Ok(resources)
}

/// The name of a TCP state of `/proc/net/tcp` (`include/net/tcp_states.h`).
fn tcp_state_name(state: u8) -> String {
    let name = match state {
        0x01 => "ESTABLISHED",
        0x02 => "SYN_SENT",
        0x03 => "SYN_RECV",
        0x04 => "FIN_WAIT1",
        0x05 => "FIN_WAIT2",
        0x06 => "TIME_WAIT",
        0x07 => "CLOSE",
        0x08 => "CLOSE_WAIT",
        0x09 => "LAST_ACK",
        0x0A => "LISTEN",
        0x0B => "CLOSING",
        0x0C => "NEW_SYN_RECV",
        other => return format!("state {other:#04x}"),
    };
    name.to_owned()
}

/// The inode of a descriptor's link text `socket:[INODE]`.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The state and inode of one line of `/proc/net/{tcp,udp}{,6}`:
/// `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`.
fn net_line(line: &str) -> Option<(u8, u64)> {
    let fields: Vec<&str> = line.split_whitespace().take(10).collect();
    let state = u8::from_str_radix(fields.get(3)?, 16).ok()?;
    let inode = fields.get(9)?.parse().ok()?;
    Some((state, inode))
}

/// User plus system CPU time of process `pid` (all its threads), in clock
/// ticks.
pub(super) fn cpu_ticks(pid: u32) -> BenchResult<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat_ticks(&stat).ok_or_else(|| format!("cannot read utime/stime in /proc/{pid}/stat").into())
}

/// `utime + stime` of a `/proc/PID/stat` text. The command name (field 2)
/// is in parentheses and may hold spaces, so fields are counted after the
/// last `)`: state is field 3, utime 14, stime 15.
fn stat_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().take(13).collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`), 100 (the Linux value)
/// when it cannot be read.
pub(super) fn clock_ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|&t: &u64| t > 0)
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_lines_are_read() {
        assert_eq!(socket_inode("socket:[123456]"), Some(123_456));
        assert_eq!(socket_inode("pipe:[12]"), None);
        assert_eq!(socket_inode("anon_inode:[eventpoll]"), None);

        let tcp = "   0: 0100007F:1E61 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5551 1 0000000000000000 100 0 0 10 0";
        assert_eq!(net_line(tcp), Some((TCP_LISTEN, 5551)));
        let tcp6 = "   3: 0000000000000000FFFF00000100007F:E2C4 0000000000000000FFFF00000100007F:1E61 01 00000000:00000000 00:00000000 00000000  1000        0 77 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(net_line(tcp6), Some((TCP_ESTABLISHED, 77)));
        assert_eq!(tcp_state_name(0x08), "CLOSE_WAIT");
        assert_eq!(tcp_state_name(0x42), "state 0x42");
        assert_eq!(
            net_line("  sl  local_address rem_address   st tx_queue rx_queue"),
            None
        );

        let stat = "4242 (mpreg (bench)) S 1 4242 4242 0 -1 4194560 2000 0 0 0 150 37 0 0 20 0 9 0 100 0 0";
        assert_eq!(stat_ticks(stat), Some(187));
        assert_eq!(stat_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn this_process_is_measured() {
        let r = own_resources(0, 1).expect("/proc/self");
        assert!(r.rss_kib > 0 && r.threads >= 1 && r.fds >= 3);
        assert_eq!(r.baseline_kib, 1);
        assert!(cpu_ticks(std::process::id()).is_ok());
        assert!(clock_ticks_per_sec() > 0);
    }
}
