//! The replies the original Python project's later client reads
//! ([`Dialect::Later`](super::Dialect::Later)).
//!
//! That client (`MPREGClientAPI`, `mpreg client call`) sends the flat
//! envelope without mpreg's marker and reads every reply with a model that
//! wants `error.code` to be an integer, and has the fields
//! `intermediate_results` (a list) and `execution_summary` (an object or
//! `null`). A reply it cannot read leaves its caller waiting, so every
//! reply in this form carries them all.
//!
//! Its `return_intermediate_results` asks for the run level by level: a
//! command's level is its depth in the plan (0 for a command that references
//! none, else one more than the deepest command it references); `r` holds
//! the last level's results and `intermediate_results` one entry per level.
//! mpreg runs commands as their inputs are ready, not level by level: a
//! level's time is measured from the end of the previous level (the moment
//! the last result of that level or an earlier one was known) to its own
//! end, so the levels' times add up to the time to the last result.
//!
//! Everything here is pure: the node passes the results, the plan's depths
//! and when each result was known.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::ser::{Serialize, SerializeStruct, Serializer};
use serde_json::{Value, json};

use super::ResultMap;
use crate::error::{ErrorCode, RpcError};
use crate::payload::{Payload, string_len};

/// The number the original server's later release uses for the kind of
/// failure `code` is: what its client gets as `error.code`.
///
/// | number | the original's meaning | mpreg codes |
/// |---|---|---|
/// | 1001 | command not found | `unknown_function`, `no_node_for_datasets` |
/// | 1002 | internal error | `internal` |
/// | 1003 | execution failed | `cycle`, `bad_arguments`, `handler_failed`, `node_lost`, `too_large` |
/// | 1004 | timeout or invalid request | `bad_request`, `duplicate_name`, `timeout` |
/// | 403 | access denied | `unauthorized` |
/// | 429 | rate limited | `overloaded` |
///
/// (1000, the original's "unknown message type", is not used: a message
/// of another role is a `bad_request`.)
pub(crate) fn code_number(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::UnknownFunction | ErrorCode::NoNodeForDatasets => 1001,
        ErrorCode::Internal | ErrorCode::Unknown => 1002,
        ErrorCode::Cycle
        | ErrorCode::BadArguments
        | ErrorCode::HandlerFailed
        | ErrorCode::NodeLost
        | ErrorCode::TooLarge => 1003,
        ErrorCode::BadRequest | ErrorCode::DuplicateName | ErrorCode::Timeout => 1004,
        ErrorCode::Unauthorized => 403,
        ErrorCode::Overloaded => 429,
    }
}

/// The mpreg code closest to the original's number `n` (for a reply that
/// carries only a number): several codes share a number, so this is the
/// broadest of them; a number the original does not use is
/// [`ErrorCode::Unknown`].
pub(crate) fn code_of_number(n: i64) -> ErrorCode {
    match n {
        1001 => ErrorCode::UnknownFunction,
        1002 => ErrorCode::Internal,
        1003 => ErrorCode::HandlerFailed,
        1000 | 1004 => ErrorCode::BadRequest,
        403 => ErrorCode::Unauthorized,
        429 => ErrorCode::Overloaded,
        _ => ErrorCode::Unknown,
    }
}

/// How a run went, as the level report needs it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Timing {
    /// Per step (by index), its depth in the plan.
    pub(crate) depths: Vec<usize>,
    /// Per step, when its result was known here, from the start of the run.
    pub(crate) done: Vec<Duration>,
    /// From the start of the run to its end.
    pub(crate) total: Duration,
    /// The wall clock at the start of the run.
    pub(crate) started: SystemTime,
}

/// The end of each level, from the start of the run: the moment the last
/// result of that level, or of an earlier one, was known (so the ends never
/// go back). As many entries as levels (the deepest depth plus one).
pub(crate) fn level_ends(depths: &[usize], done: &[Duration]) -> Vec<Duration> {
    let levels = depths.iter().max().map_or(0, |d| d + 1);
    let mut ends = vec![Duration::ZERO; levels];
    for (&depth, &at) in depths.iter().zip(done) {
        ends[depth] = ends[depth].max(at);
    }
    for k in 1..levels {
        ends[k] = ends[k].max(ends[k - 1]);
    }
    ends
}

/// Orders `results` (one per step, in step order, beside `depths`) by level,
/// then by name, and returns where each level ends in them.
pub(crate) fn group_levels(results: &mut Vec<(String, Payload)>, depths: &[usize]) -> Vec<usize> {
    let mut leveled: Vec<(usize, (String, Payload))> = depths
        .iter()
        .copied()
        .zip(std::mem::take(results))
        .collect();
    leveled.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| (a.1).0.cmp(&(b.1).0)));
    let levels = leveled.last().map_or(0, |(d, _)| d + 1);
    let mut ends = vec![0; levels];
    for (i, (depth, _)) in leveled.iter().enumerate() {
        ends[*depth] = i + 1;
    }
    // A level without results (there is none in a plan) ends where the
    // previous one does.
    for k in 1..levels {
        ends[k] = ends[k].max(ends[k - 1]);
    }
    results.extend(leveled.into_iter().map(|(_, r)| r));
    ends
}

/// The later client's account of a run: its levels (with
/// `return_intermediate_results`) and its summary (with
/// `include_execution_summary`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Report {
    /// The request's id as a string (the client's id is one).
    request_id: String,
    /// With levels: where each level's results end in the answer's
    /// results (ordered by [`group_levels`]).
    level_ends: Option<Vec<usize>>,
    /// Per level: its time from the end of the previous level, in ms.
    level_ms: Vec<f64>,
    /// Per level: the wall clock at its end, in seconds since the Unix
    /// epoch.
    level_stamps: Vec<f64>,
    /// From the start of the run to its end, in ms.
    total_ms: f64,
    /// How many commands ran.
    commands: usize,
    /// Whether the reply carries the summary.
    summary: bool,
}

/// Room for one intermediate entry's fields other than its two maps: their
/// names (135 bytes) and five numbers (at most 25 bytes each).
const ENTRY_ROOM: usize = 300;

/// Room for the summary, less its list of level times.
const SUMMARY_ROOM: usize = 400;

/// Room for a number in a list.
const NUMBER_ROOM: usize = 26;

/// Room for the reply's fields other than `r`, `intermediate_results`' items
/// and the summary, less its id: their names, `"rpc-response"`, `null`s,
/// brackets and braces (about 100 bytes).
const ENVELOPE_ROOM: usize = 128;

impl Report {
    /// The report of a run of request `u` whose `timing` is given. With
    /// `levels`, `results` holds every command's result in step order, and
    /// is reordered by level (see [`group_levels`]); otherwise it is left
    /// as it is.
    pub(crate) fn new(
        u: &Value,
        results: &mut Vec<(String, Payload)>,
        timing: &Timing,
        levels: bool,
        summary: bool,
    ) -> Self {
        let request_id = match u {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let level_ends = levels.then(|| group_levels(results, &timing.depths));
        let ends = level_ends_or_one(&timing.depths, &timing.done, timing.total);
        let mut level_ms = Vec::with_capacity(ends.len());
        let mut level_stamps = Vec::with_capacity(ends.len());
        let mut before = Duration::ZERO;
        for &end in &ends {
            level_ms.push(ms(end.saturating_sub(before)));
            let wall = timing.started.checked_add(end).unwrap_or(timing.started);
            level_stamps.push(
                wall.duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
            );
            before = end;
        }
        Self {
            request_id,
            level_ends,
            level_ms,
            level_stamps,
            total_ms: ms(timing.total),
            commands: timing.depths.len(),
            summary,
        }
    }

    /// The results the reply's `r` holds: the last level's with levels,
    /// else all of `results`.
    pub(crate) fn r<'a>(&self, results: &'a [(String, Payload)]) -> &'a [(String, Payload)] {
        match self.level_ends.as_deref() {
            Some([.., before, last]) => &results[*before..*last],
            Some([last]) => &results[..*last],
            _ => results,
        }
    }

    /// At least the length of the reply's text, computed without writing
    /// it: with levels, a result is written once per level from its own on
    /// (in `accumulated_results`), so this can be many times the results'
    /// own size.
    pub(crate) fn reply_len(&self, results: &[(String, Payload)]) -> usize {
        let entry = |(name, value): &(String, Payload)| {
            // The name, its colon, the value and a comma.
            string_len(name)
                .saturating_add(value.json_len())
                .saturating_add(2)
        };
        // The reply's `u` is no longer than the id as a string (a number's
        // text is its JSON text); `r`'s braces.
        let mut total = ENVELOPE_ROOM + string_len(&self.request_id) + 2;
        for r in self.r(results) {
            total = total.saturating_add(entry(r));
        }
        if let Some(ends) = &self.level_ends {
            let id = string_len(&self.request_id);
            let mut prefix = 0usize;
            let mut start = 0usize;
            for &end in ends {
                let level: usize = results[start..end]
                    .iter()
                    .map(entry)
                    .fold(0, usize::saturating_add);
                prefix = prefix.saturating_add(level);
                total = total
                    .saturating_add(ENTRY_ROOM + id + 4)
                    .saturating_add(level)
                    .saturating_add(prefix);
                start = end;
            }
        }
        if self.summary {
            total = total
                .saturating_add(SUMMARY_ROOM + string_len(&self.request_id))
                .saturating_add(self.level_ms.len().saturating_mul(NUMBER_ROOM));
        }
        total
    }

    /// `too_large` when the reply's text (see [`reply_len`](Self::reply_len))
    /// would be longer than `limit`.
    pub(crate) fn fits(&self, results: &[(String, Payload)], limit: usize) -> Result<(), RpcError> {
        let bytes = self.reply_len(results);
        if bytes <= limit {
            return Ok(());
        }
        Err(RpcError::new(
            ErrorCode::TooLarge,
            format!(
                "the level-by-level reply repeats results and would be {bytes} bytes, over the message limit of {limit}; ask without return_intermediate_results"
            ),
        )
        .with_details(json!({ "limit": limit, "bytes": bytes })))
    }

    /// The `intermediate_results` list of the reply.
    pub(crate) fn intermediate<'a>(&'a self, results: &'a [(String, Payload)]) -> Intermediate<'a> {
        Intermediate {
            report: self,
            results,
        }
    }

    /// The `execution_summary` of the reply, when it carries one.
    pub(crate) fn summary(&self) -> Option<Summary<'_>> {
        self.summary.then_some(Summary(self))
    }
}

/// The level ends of a run; a run without steps (none reaches here) has
/// one level ending at `total`.
fn level_ends_or_one(depths: &[usize], done: &[Duration], total: Duration) -> Vec<Duration> {
    let ends = level_ends(depths, done);
    if ends.is_empty() { vec![total] } else { ends }
}

/// A duration in milliseconds, as the original writes times.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The reply's `intermediate_results`: one entry per level.
pub(crate) struct Intermediate<'a> {
    report: &'a Report,
    results: &'a [(String, Payload)],
}

impl Serialize for Intermediate<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;

        let report = self.report;
        let ends = report.level_ends.as_deref().unwrap_or_default();
        let mut seq = s.serialize_seq(Some(ends.len()))?;
        let mut start = 0;
        for (k, &end) in ends.iter().enumerate() {
            seq.serialize_element(&Level {
                report,
                index: k,
                level: &self.results[start..end],
                accumulated: &self.results[..end],
                total: ends.len(),
            })?;
            start = end;
        }
        seq.end()
    }
}

/// One entry of `intermediate_results`.
struct Level<'a> {
    report: &'a Report,
    index: usize,
    level: &'a [(String, Payload)],
    accumulated: &'a [(String, Payload)],
    total: usize,
}

impl Serialize for Level<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let report = self.report;
        let mut e = s.serialize_struct("RPCIntermediateResult", 8)?;
        e.serialize_field("request_id", &report.request_id)?;
        e.serialize_field("level_index", &self.index)?;
        e.serialize_field("level_results", &ResultMap(self.level))?;
        e.serialize_field("accumulated_results", &ResultMap(self.accumulated))?;
        e.serialize_field("total_levels", &self.total)?;
        e.serialize_field("completed_levels", &(self.index + 1))?;
        e.serialize_field("timestamp", &report.level_stamps.get(self.index))?;
        e.serialize_field("execution_time_ms", &report.level_ms.get(self.index))?;
        e.end()
    }
}

/// The reply's `execution_summary`.
pub(crate) struct Summary<'a>(&'a Report);

impl Serialize for Summary<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let report = self.0;
        let times = &report.level_ms;
        // The first of the longest levels.
        let bottleneck = times
            .iter()
            .enumerate()
            .fold(
                (0, f64::MIN),
                |best, (i, &t)| if t > best.1 { (i, t) } else { best },
            )
            .0;
        let average = if times.is_empty() {
            0.0
        } else {
            times.iter().sum::<f64>() / times.len() as f64
        };
        let mut e = s.serialize_struct("RPCExecutionSummary", 8)?;
        e.serialize_field("request_id", &report.request_id)?;
        e.serialize_field("total_execution_time_ms", &report.total_ms)?;
        e.serialize_field("total_levels", &times.len())?;
        e.serialize_field("level_execution_times", times)?;
        e.serialize_field("bottleneck_level_index", &bottleneck)?;
        e.serialize_field("average_level_time_ms", &average)?;
        e.serialize_field("parallel_commands_executed", &report.commands)?;
        // One cluster: no call crosses to another.
        e.serialize_field("cross_cluster_hops", &0)?;
        e.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(names: &[&str]) -> Vec<(String, Payload)> {
        names
            .iter()
            .map(|n| (n.to_string(), Payload::Tree(json!(format!("v-{n}")))))
            .collect()
    }

    fn names(results: &[(String, Payload)]) -> Vec<&str> {
        results.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn ms_(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn every_code_has_a_number_of_the_original() {
        let want = [
            (ErrorCode::BadRequest, 1004),
            (ErrorCode::DuplicateName, 1004),
            (ErrorCode::Cycle, 1003),
            (ErrorCode::UnknownFunction, 1001),
            (ErrorCode::NoNodeForDatasets, 1001),
            (ErrorCode::BadArguments, 1003),
            (ErrorCode::HandlerFailed, 1003),
            (ErrorCode::Timeout, 1004),
            (ErrorCode::NodeLost, 1003),
            (ErrorCode::Overloaded, 429),
            (ErrorCode::TooLarge, 1003),
            (ErrorCode::Unauthorized, 403),
            (ErrorCode::Internal, 1002),
            (ErrorCode::Unknown, 1002),
        ];
        assert_eq!(want.len(), ErrorCode::ALL.len());
        for (code, number) in want {
            assert_eq!(code_number(code), number, "{code}");
        }
        // Every number reads back as a code with that number.
        for code in ErrorCode::ALL {
            let n = code_number(code);
            assert_eq!(code_number(code_of_number(n.into())), n, "{code}");
        }
        assert_eq!(code_of_number(1000), ErrorCode::BadRequest);
        assert_eq!(code_of_number(7), ErrorCode::Unknown);
        assert_eq!(code_of_number(-1), ErrorCode::Unknown);
    }

    #[test]
    fn levels_are_grouped_by_depth_then_name() {
        // a, z: level 0; c (a), b (z): level 1; d (c, b): level 2.
        let mut r = results(&["z", "c", "a", "d", "b"]);
        let depths = [0, 1, 0, 2, 1];
        let ends = group_levels(&mut r, &depths);
        assert_eq!(names(&r), ["a", "z", "b", "c", "d"]);
        assert_eq!(ends, [2, 4, 5]);
        // One level.
        let mut r = results(&["y", "x"]);
        assert_eq!(group_levels(&mut r, &[0, 0]), [2]);
        assert_eq!(names(&r), ["x", "y"]);
        // Nothing.
        let mut r = Vec::new();
        assert_eq!(group_levels(&mut r, &[]), Vec::<usize>::new());
    }

    #[test]
    fn level_ends_never_go_back() {
        // Level 1 (b) finished before level 0's slow `c`: level 1 ends with
        // level 0.
        let depths = [0, 1, 0, 2];
        let done = [ms_(10), ms_(15), ms_(40), ms_(50)];
        assert_eq!(level_ends(&depths, &done), [ms_(40), ms_(40), ms_(50)]);
        assert_eq!(level_ends(&[], &[]), Vec::<Duration>::new());
    }

    fn timing(depths: Vec<usize>, done: Vec<Duration>, total: Duration) -> Timing {
        Timing {
            depths,
            done,
            total,
            started: UNIX_EPOCH + Duration::from_secs(1_000),
        }
    }

    #[test]
    fn a_report_lists_every_level_with_its_results_so_far() {
        // first -> second -> third (chain), and free beside first.
        let mut r = results(&["first", "second", "third", "free"]);
        let t = timing(
            vec![0, 1, 2, 0],
            vec![ms_(5), ms_(7), ms_(12), ms_(3)],
            ms_(13),
        );
        let report = Report::new(&json!("u-1"), &mut r, &t, true, true);
        assert_eq!(names(report.r(&r)), ["third"]);
        let list = serde_json::to_value(report.intermediate(&r)).expect("json");
        let levels = list.as_array().expect("a list");
        assert_eq!(levels.len(), 3);
        assert_eq!(
            levels[0],
            json!({
                "request_id": "u-1", "level_index": 0,
                "level_results": {"first": "v-first", "free": "v-free"},
                "accumulated_results": {"first": "v-first", "free": "v-free"},
                "total_levels": 3, "completed_levels": 1,
                "timestamp": 1000.005, "execution_time_ms": 5.0,
            })
        );
        assert_eq!(levels[1]["level_results"], json!({"second": "v-second"}));
        assert_eq!(
            levels[2]["accumulated_results"],
            json!({"first": "v-first", "free": "v-free", "second": "v-second", "third": "v-third"})
        );
        assert_eq!(levels[2]["completed_levels"], 3);
        assert_eq!(levels[1]["execution_time_ms"], 2.0);
        assert_eq!(levels[2]["execution_time_ms"], 5.0);
        let summary = serde_json::to_value(report.summary()).expect("json");
        assert_eq!(
            summary,
            json!({
                "request_id": "u-1", "total_execution_time_ms": 13.0, "total_levels": 3,
                "level_execution_times": [5.0, 2.0, 5.0], "bottleneck_level_index": 0,
                "average_level_time_ms": 4.0, "parallel_commands_executed": 4,
                "cross_cluster_hops": 0,
            })
        );
    }

    #[test]
    fn a_summary_alone_leaves_the_results_as_they_are() {
        let mut r = results(&["b", "a"]);
        let t = timing(vec![1, 0], vec![ms_(2), ms_(1)], ms_(2));
        let report = Report::new(&json!(7), &mut r, &t, false, true);
        assert_eq!(names(&r), ["b", "a"]);
        assert_eq!(names(report.r(&r)), ["b", "a"]);
        assert_eq!(
            serde_json::to_value(report.intermediate(&r)).expect("json"),
            json!([])
        );
        let summary = serde_json::to_value(report.summary()).expect("json");
        assert_eq!(summary["request_id"], "7", "a number id is written as text");
        assert_eq!(summary["total_levels"], 2);
        let none = Report::new(&json!("x"), &mut r, &t, true, false);
        assert!(none.summary().is_none());
    }

    #[test]
    fn the_reply_length_covers_what_is_written() {
        let big = |n: &str| (n.to_string(), Payload::Tree(json!("x".repeat(1000))));
        // A chain of five.
        let mut r: Vec<_> = ["a", "b", "c", "d", "e"].into_iter().map(big).collect();
        let t = timing(vec![0, 1, 2, 3, 4], vec![ms_(1); 5], ms_(1));
        let report = Report::new(&json!("u"), &mut r, &t, true, true);
        let answer = super::super::Answer::reported(
            super::super::ReplyTo {
                u: json!("u"),
                dialect: super::super::Dialect::Later,
            },
            r.clone(),
            report.clone(),
            usize::MAX,
        );
        let written = answer.encode().len();
        let counted = report.reply_len(&r);
        assert!(counted >= written, "{counted} < {written}");
        // Each result is written in its level, in the accumulated results
        // of its level and every later one, and the last in `r`: 21 times
        // 1 KB. The estimate is close.
        assert!(written > 21 * 1000, "{written}");
        assert!(
            counted < written + 5 * ENTRY_ROOM + SUMMARY_ROOM + ENVELOPE_ROOM,
            "{counted} vs {written}"
        );
        assert!(report.fits(&r, counted).is_ok());
        let e = report.fits(&r, 10_000).expect_err("over");
        assert_eq!(e.code, ErrorCode::TooLarge);
        assert_eq!(e.details, Some(json!({"limit": 10_000, "bytes": counted})));
    }
}
