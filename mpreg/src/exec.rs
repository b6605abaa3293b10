//! The dataflow executor: each step starts the moment its last input is
//! ready; independent steps run concurrently, as separate tasks.
//!
//! Where a step runs is not the executor's business: it hands each ready step
//! to a [`Dispatch`]. Dropping the future returned by [`execute`] cancels
//! every step still running (their tasks are aborted), which is how request
//! deadlines and client disconnects cancel work.

use std::any::Any;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde_json::{Map, Value};
use tokio::task::JoinSet;

use crate::error::{ErrorCode, RpcError};
use crate::plan::{Arg, Plan, Step};
use crate::registry::Args;

/// Runs one step's function somewhere.
pub(crate) trait Dispatch: Sync {
    /// Starts `fun` with `args` on a place that has every dataset in `locs`.
    /// The returned future must not borrow from `self`: it may be moved to
    /// another task.
    fn dispatch(
        &self,
        fun: &str,
        locs: &[String],
        args: Args,
    ) -> BoxFuture<'static, Result<Value, RpcError>>;
}

/// What a step's task yields: its index and its outcome.
type Finished = (usize, Result<Value, RpcError>);

/// Runs `plan` to completion and returns the results of its sinks (or of
/// every step, with `intermediate`). The first failing step fails the whole
/// request, with that step's name in the error; the steps still running are
/// cancelled.
pub(crate) async fn execute(
    plan: Plan,
    dispatcher: &dyn Dispatch,
    intermediate: bool,
) -> Result<Map<String, Value>, RpcError> {
    let Plan {
        mut steps,
        dependents,
        sinks,
    } = plan;
    let n = steps.len();

    // One step: no scheduling needed, and no task to spawn.
    if n == 1 {
        let step = &mut steps[0];
        let args = Args::new(
            step.args.drain(..).map(literal).collect(),
            step.kwargs
                .drain(..)
                .map(|(k, a)| (k, literal(a)))
                .collect(),
        );
        let value = guarded(dispatcher.dispatch(&step.fun, &step.locs, args))
            .await
            .map_err(|e| e.with_command(step.name.clone()))?;
        let mut out = Map::new();
        out.insert(std::mem::take(&mut step.name), value);
        return Ok(out);
    }

    let returned: Vec<bool> = if intermediate {
        vec![true; n]
    } else {
        let mut r = vec![false; n];
        for &s in &sinks {
            r[s] = true;
        }
        r
    };
    // How many times each result will still be read: once per reference to
    // it, plus once for the reply. The last reader takes it without a copy.
    let mut reads_left: Vec<usize> = returned.iter().map(|&r| usize::from(r)).collect();
    for step in &steps {
        for arg in step.all_args() {
            if let Arg::Ref(j) = arg {
                reads_left[*j] += 1;
            }
        }
    }
    let mut run = Dataflow {
        waiting: steps.iter().map(|s| s.deps.len()).collect(),
        results: vec![None; n],
        reads_left,
        running: JoinSet::new(),
        steps,
        dispatcher,
    };
    for i in 0..n {
        if run.waiting[i] == 0 {
            run.start(i);
        }
    }
    while let Some(joined) = run.running.join_next().await {
        let (i, outcome) = joined
            .map_err(|e| RpcError::new(ErrorCode::Internal, format!("command task failed: {e}")))?;
        let value = outcome.map_err(|e| e.with_command(run.steps[i].name.clone()))?;
        run.results[i] = Some(value);
        for &d in &dependents[i] {
            run.waiting[d] -= 1;
            if run.waiting[d] == 0 {
                run.start(d);
            }
        }
    }

    let mut out = Map::new();
    for (i, step) in run.steps.into_iter().enumerate() {
        if returned[i] {
            let value = run.results[i].take().ok_or_else(|| {
                RpcError::new(ErrorCode::Internal, "a command never ran")
                    .with_command(step.name.clone())
            })?;
            out.insert(step.name, value);
        }
    }
    Ok(out)
}

/// The state of one multi-step execution.
struct Dataflow<'d> {
    steps: Vec<Step>,
    /// Inputs each step still waits for.
    waiting: Vec<usize>,
    /// Finished results, until their last reader takes them.
    results: Vec<Option<Value>>,
    /// Reads each result still has coming (references, and the reply).
    reads_left: Vec<usize>,
    /// The steps running now; dropping the set aborts them.
    running: JoinSet<Finished>,
    dispatcher: &'d dyn Dispatch,
}

impl Dataflow<'_> {
    /// Starts step `i`, whose inputs are all ready.
    fn start(&mut self, i: usize) {
        let step = &mut self.steps[i];
        let (results, reads_left) = (&mut self.results, &mut self.reads_left);
        let mut take = |arg: Arg| match arg {
            Arg::Value(v) => v,
            Arg::Ref(j) => {
                reads_left[j] -= 1;
                if reads_left[j] == 0 {
                    results[j].take().unwrap_or(Value::Null)
                } else {
                    results[j].clone().unwrap_or(Value::Null)
                }
            }
        };
        let args = Args::new(
            step.args.drain(..).map(&mut take).collect(),
            step.kwargs.drain(..).map(|(k, a)| (k, take(a))).collect(),
        );
        let call = guarded(self.dispatcher.dispatch(&step.fun, &step.locs, args));
        self.running.spawn(async move { (i, call.await) });
    }
}

/// A single-step argument: there are no other steps to refer to.
fn literal(arg: Arg) -> Value {
    match arg {
        Arg::Value(v) => v,
        // A one-step plan has no references; keep the planner honest anyway.
        Arg::Ref(_) => Value::Null,
    }
}

/// Turns a panic inside a handler into a `handler_failed` error, so one bad
/// handler never takes down a connection or the node.
async fn guarded(call: BoxFuture<'static, Result<Value, RpcError>>) -> Result<Value, RpcError> {
    match AssertUnwindSafe(call).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(payload) => Err(RpcError::handler_failed(format!(
            "handler panicked: {}",
            panic_message(&*payload)
        ))),
    }
}

/// The message of a panic payload (`&str` or `String`), or a placeholder.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(non-string panic payload)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Command;
    use serde_json::json;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::sync::Notify;

    /// A dispatcher with a few test functions and a call counter per name.
    #[derive(Default)]
    struct TestFns {
        calls: Arc<std::sync::Mutex<Vec<String>>>,
        gate: Arc<Notify>,
        in_flight: Arc<AtomicUsize>,
    }

    impl Dispatch for TestFns {
        fn dispatch(
            &self,
            fun: &str,
            _locs: &[String],
            args: Args,
        ) -> BoxFuture<'static, Result<Value, RpcError>> {
            self.calls.lock().expect("lock").push(fun.to_owned());
            let (pos, _) = args.into_parts();
            let fun = fun.to_owned();
            let gate = self.gate.clone();
            let in_flight = self.in_flight.clone();
            Box::pin(async move {
                match fun.as_str() {
                    "echo" => Ok(pos.into_iter().next().unwrap_or(Value::Null)),
                    "echos" => Ok(Value::Array(pos)),
                    "upper" => Ok(json!(pos[0].as_str().unwrap_or_default().to_uppercase())),
                    "fail" => Err(RpcError::handler_failed("failed on purpose")),
                    "panic" => panic!("panicked on purpose"),
                    // Waits until released; counts how many wait at once.
                    "wait" => {
                        in_flight.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        Ok(Value::Null)
                    }
                    _ => Err(RpcError::new(ErrorCode::UnknownFunction, fun)),
                }
            })
        }
    }

    fn plan(cmds: Vec<Command>) -> Plan {
        Plan::new(cmds, 10_000).expect("valid plan")
    }

    fn c(name: &str, fun: &str, args: Value) -> Command {
        Command::new(name, fun).args(args.as_array().cloned().unwrap_or_default())
    }

    #[tokio::test]
    async fn reference_examples() {
        let d = TestFns::default();
        let cases = [
            (
                vec![c("first", "echo", json!(["hi there!"]))],
                json!({"first": "hi there!"}),
            ),
            (
                vec![
                    c("first", "echo", json!(["hi there!"])),
                    c("second", "echo", json!(["first"])),
                ],
                json!({"second": "hi there!"}),
            ),
            (
                vec![
                    c("|first", "echo", json!(["hi there!"])),
                    c("|second", "echo", json!(["|first"])),
                    c("|third", "echos", json!(["|first", "AND ME TOO"])),
                ],
                json!({"|second": "hi there!", "|third": ["hi there!", "AND ME TOO"]}),
            ),
            (
                vec![
                    c("|first", "echo", json!(["hi there!"])),
                    c("|second", "echo", json!(["|first"])),
                    c(
                        "|third",
                        "echos",
                        json!(["|first", "|second", "AND ME TOO"]),
                    ),
                ],
                json!({"|third": ["hi there!", "hi there!", "AND ME TOO"]}),
            ),
            (
                vec![
                    c("|first", "echo", json!(["hi there!"])),
                    c("|second", "echo", json!(["|first"])),
                    c(
                        "|third",
                        "echos",
                        json!(["|first", "|second", "AND ME TOO"]),
                    ),
                    c("|4th", "echo", json!(["|third"])),
                ],
                json!({"|4th": ["hi there!", "hi there!", "AND ME TOO"]}),
            ),
        ];
        for (cmds, expected) in cases {
            let out = execute(plan(cmds), &d, false).await.expect("runs");
            assert_eq!(Value::Object(out), expected);
        }
    }

    #[tokio::test]
    async fn string_result_equal_to_a_name_stays_a_value() {
        let d = TestFns::default();
        let out = execute(
            plan(vec![
                c("a", "upper", json!(["x"])),
                c("X", "echo", json!(["X-result"])),
                c("c", "echos", json!(["a"])),
            ]),
            &d,
            false,
        )
        .await
        .expect("runs");
        // `a` computes the string "X", the name of another command: `c`
        // receives that string, not `X`'s result.
        assert_eq!(out["c"], json!(["X"]));
        assert_eq!(out["X"], json!("X-result"));
    }

    #[tokio::test]
    async fn diamond_runs_shared_input_once_and_intermediate_returns_all() {
        let d = TestFns::default();
        let out = execute(
            plan(vec![
                c("top", "echo", json!([1])),
                c("l", "echo", json!(["top"])),
                c("r", "echo", json!(["top"])),
                c("join", "echos", json!(["l", "r", "top"])),
            ]),
            &d,
            true,
        )
        .await
        .expect("runs");
        assert_eq!(out["join"], json!([1, 1, 1]));
        assert_eq!(out.len(), 4);
        let calls = d.calls.lock().expect("lock").clone();
        assert_eq!(calls.iter().filter(|f| *f == "echo").count(), 3);
    }

    #[tokio::test]
    async fn failure_names_the_failing_command_and_skips_dependents() {
        let d = TestFns::default();
        let e = execute(
            plan(vec![
                c("ok", "echo", json!([1])),
                c("bad", "fail", json!(["ok"])),
                c("after", "echo", json!(["bad"])),
            ]),
            &d,
            false,
        )
        .await
        .expect_err("fails");
        assert_eq!(e.code, ErrorCode::HandlerFailed);
        assert_eq!(e.command.as_deref(), Some("bad"));
        // `ok` ran, `bad` failed, `after` never started.
        assert_eq!(*d.calls.lock().expect("lock"), ["echo", "fail"]);
    }

    #[tokio::test]
    async fn panic_becomes_handler_failed() {
        let d = TestFns::default();
        for cmds in [
            vec![c("p", "panic", json!([]))],
            vec![c("x", "echo", json!([1])), c("p", "panic", json!(["x"]))],
        ] {
            let e = execute(plan(cmds), &d, false).await.expect_err("panics");
            assert_eq!(e.code, ErrorCode::HandlerFailed);
            assert_eq!(e.command.as_deref(), Some("p"));
            assert!(e.message.contains("panicked on purpose"), "{}", e.message);
        }
    }

    #[tokio::test]
    async fn independent_steps_run_concurrently() {
        let d = TestFns::default();
        let in_flight = d.in_flight.clone();
        let gate = d.gate.clone();
        let cmds = (0..3)
            .map(|i| c(&format!("w{i}"), "wait", json!([])))
            .collect();
        let run = tokio::spawn(async move { execute(plan(cmds), &d, false).await });
        // All three must be waiting at once before any is released: a
        // level-by-level or sequential executor would never get there.
        tokio::time::timeout(Duration::from_secs(30), async {
            while in_flight.load(Ordering::SeqCst) < 3 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("three steps in flight together");
        gate.notify_waiters();
        let out = run.await.expect("join").expect("runs");
        assert_eq!(out.len(), 3);
    }

    #[tokio::test]
    async fn thousand_step_chain_and_fan_out() {
        let d = TestFns::default();
        let mut chain = vec![c("c0", "echo", json!(["x"]))];
        for i in 1..1000 {
            chain.push(c(&format!("c{i}"), "echo", json!([format!("c{}", i - 1)])));
        }
        let out = execute(plan(chain), &d, false).await.expect("chain");
        assert_eq!(Value::Object(out), json!({"c999": "x"}));

        let mut fan = vec![c("root", "echo", json!([7]))];
        for i in 0..1000 {
            fan.push(c(&format!("f{i}"), "echo", json!(["root"])));
        }
        let out = execute(plan(fan), &d, false).await.expect("fan-out");
        assert_eq!(out.len(), 1000);
        assert!(out.values().all(|v| *v == json!(7)));
    }
}
