use super::*;
use crate::protocol::Command;

/// Results as trees.
fn trees(out: Vec<(String, Payload)>) -> serde_json::Map<String, Value> {
    out.into_iter()
        .map(|(k, v)| (k, v.into_value().expect("readable")))
        .collect()
}
use crate::registry::Args;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Where a test step runs: here, or on a pretend remote node named by a
/// letter (`"echo@b"` runs `echo` on node `b`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Where {
    Here,
    Node(char),
}

/// Jobs seen: where each went and the names of its steps.
type JobLog = Arc<Mutex<Vec<(Where, Vec<String>)>>>;

/// Test functions, a log of calls and of jobs, and a gate for `wait`.
#[derive(Default, Clone)]
struct TestFns {
    calls: Arc<Mutex<Vec<String>>>,
    jobs: JobLog,
    gate: Arc<Notify>,
    in_flight: Arc<AtomicUsize>,
}

/// The same functions, but everything runs here (what a remote node does
/// with a job it receives).
struct OnlyHere(TestFns);

fn split(fun: &str) -> (&str, Where) {
    match fun.split_once('@') {
        Some((f, node)) => (f, Where::Node(node.chars().next().unwrap_or('?'))),
        None => (fun, Where::Here),
    }
}

impl TestFns {
    fn call(&self, fun: &str, args: Args) -> BoxFuture<'static, Result<Value, RpcError>> {
        let (fun, _) = split(fun);
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
                // Sleeps its first argument's milliseconds, returns it.
                "sleep" => {
                    let ms = pos.first().and_then(Value::as_u64).unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(json!(ms))
                }
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

    fn run_here(&self, job: Job) -> BoxFuture<'static, Result<Vec<Payload>, RpcError>> {
        if let [step] = &job.steps[..] {
            let args = Args::new(
                step.args.iter().map(literal).collect(),
                step.kwargs
                    .iter()
                    .map(|(k, a)| (k.clone(), literal(a)))
                    .collect(),
            );
            let call = self.call(&step.fun, args);
            return Box::pin(async move { call.await.map(|v| vec![Payload::Tree(v)]) });
        }
        let here = OnlyHere(self.clone());
        Box::pin(async move {
            let plan = Plan::from_steps(job.steps)?;
            let out = execute(plan, &here, Wanted::These(job.outputs)).await?;
            Ok(out.into_iter().map(|(_, v)| v).collect())
        })
    }
}

fn literal(arg: &Arg) -> Value {
    match arg {
        Arg::Value(v) => v.clone().into_value().expect("a readable value"),
        Arg::Ref(_) => panic!("a one-step job has no references"),
    }
}

impl Dispatch for TestFns {
    type Target = Where;

    fn place(&self, step: &Step) -> Result<Where, RpcError> {
        if step.fun == "nowhere" {
            return Err(RpcError::new(ErrorCode::UnknownFunction, "nowhere"));
        }
        Ok(split(&step.fun).1)
    }

    fn ships_chains(&self, target: &Where) -> bool {
        matches!(target, Where::Node(_))
    }

    fn run(&self, target: Where, job: Job) -> BoxFuture<'static, Result<Vec<Payload>, RpcError>> {
        let names = job.steps.iter().map(|s| s.name.clone()).collect();
        self.jobs.lock().expect("lock").push((target, names));
        self.run_here(job)
    }
}

impl Dispatch for OnlyHere {
    type Target = Where;

    fn place(&self, _step: &Step) -> Result<Where, RpcError> {
        Ok(Where::Here)
    }

    fn ships_chains(&self, _target: &Where) -> bool {
        false
    }

    fn run(&self, _target: Where, job: Job) -> BoxFuture<'static, Result<Vec<Payload>, RpcError>> {
        self.0.run_here(job)
    }
}

fn plan(cmds: Vec<Command>) -> Plan {
    Plan::new(cmds.into_iter().map(Into::into).collect(), 10_000).expect("valid plan")
}

fn c(name: &str, fun: &str, args: Value) -> Command {
    Command::new(name, fun).args(args.as_array().cloned().unwrap_or_default())
}

async fn run(d: &TestFns, cmds: Vec<Command>, wanted: Wanted) -> Result<Value, RpcError> {
    let out = execute(plan(cmds), d, wanted).await?;
    Ok(Value::Object(trees(out)))
}

#[tokio::test]
async fn reference_examples() {
    let d = TestFns::default();
    for example in crate::demo::reference_examples() {
        let out = execute(
            Plan::new(
                example.request.cmds.into_iter().map(Into::into).collect(),
                100,
            )
            .expect("valid"),
            &d,
            Wanted::Sinks,
        )
        .await
        .expect("runs");
        assert_eq!(Value::Object(trees(out)), example.expected);
    }
}

#[tokio::test]
async fn string_result_equal_to_a_name_stays_a_value() {
    let d = TestFns::default();
    let cmds = vec![
        c("a", "upper", json!(["x"])),
        c("X", "echo", json!(["X-result"])),
        c("c", "echos", json!(["a"])),
    ];
    let out = run(&d, cmds, Wanted::Sinks).await.expect("runs");
    // `a` computes the string "X", the name of another command: `c`
    // receives that string, not `X`'s result.
    assert_eq!(out["c"], json!(["X"]));
    assert_eq!(out["X"], json!("X-result"));
}

#[tokio::test]
async fn diamond_runs_shared_input_once_and_all_returns_every_result() {
    let d = TestFns::default();
    let cmds = vec![
        c("top", "echo", json!([1])),
        c("l", "echo", json!(["top"])),
        c("r", "echo", json!(["top"])),
        c("join", "echos", json!(["l", "r", "top"])),
    ];
    let out = run(&d, cmds, Wanted::All).await.expect("runs");
    assert_eq!(out["join"], json!([1, 1, 1]));
    assert_eq!(out.as_object().map(|o| o.len()), Some(4));
    let calls = d.calls.lock().expect("lock").clone();
    assert_eq!(calls.iter().filter(|f| *f == "echo").count(), 3);
}

#[tokio::test]
async fn failure_names_the_failing_command_and_skips_dependents() {
    let d = TestFns::default();
    let cmds = vec![
        c("ok", "echo", json!([1])),
        c("bad", "fail", json!(["ok"])),
        c("after", "echo", json!(["bad"])),
    ];
    let e = run(&d, cmds, Wanted::Sinks).await.expect_err("fails");
    assert_eq!(e.code, ErrorCode::HandlerFailed);
    assert_eq!(e.command.as_deref(), Some("bad"));
    // `ok` ran, `bad` failed, `after` never started.
    assert_eq!(*d.calls.lock().expect("lock"), ["echo", "fail"]);
}

#[tokio::test]
async fn placement_error_fails_before_anything_runs() {
    let d = TestFns::default();
    let cmds = vec![c("ok", "echo", json!([1])), c("bad", "nowhere", json!([]))];
    let e = run(&d, cmds, Wanted::Sinks).await.expect_err("fails");
    assert_eq!(e.code, ErrorCode::UnknownFunction);
    assert_eq!(e.command.as_deref(), Some("bad"));
    assert!(d.calls.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn panic_becomes_handler_failed() {
    let d = TestFns::default();
    for cmds in [
        vec![c("p", "panic", json!([]))],
        vec![c("x", "echo", json!([1])), c("p", "panic", json!(["x"]))],
    ] {
        let e = run(&d, cmds, Wanted::Sinks).await.expect_err("panics");
        assert_eq!(e.code, ErrorCode::HandlerFailed);
        assert_eq!(e.command.as_deref(), Some("p"));
        assert!(e.message.contains("panicked on purpose"), "{}", e.message);
    }
}

#[tokio::test]
async fn independent_steps_run_concurrently() {
    let d = TestFns::default();
    let (in_flight, gate) = (d.in_flight.clone(), d.gate.clone());
    let cmds = (0..3)
        .map(|i| c(&format!("w{i}"), "wait", json!([])))
        .collect();
    let task = tokio::spawn(async move { run(&d, cmds, Wanted::Sinks).await });
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
    let out = task.await.expect("join").expect("runs");
    assert_eq!(out.as_object().map(|o| o.len()), Some(3));
}

#[tokio::test]
async fn thousand_step_chain_and_fan_out() {
    let d = TestFns::default();
    let mut chain = vec![c("c0", "echo", json!(["x"]))];
    for i in 1..1000 {
        chain.push(c(&format!("c{i}"), "echo", json!([format!("c{}", i - 1)])));
    }
    let out = run(&d, chain, Wanted::Sinks).await.expect("chain");
    assert_eq!(out, json!({"c999": "x"}));

    let mut fan = vec![c("root", "echo", json!([7]))];
    for i in 0..1000 {
        fan.push(c(&format!("f{i}"), "echo", json!(["root"])));
    }
    let out = run(&d, fan, Wanted::Sinks).await.expect("fan-out");
    let out = out.as_object().cloned().unwrap_or_default();
    assert_eq!(out.len(), 1000);
    assert!(out.values().all(|v| *v == json!(7)));
}

#[tokio::test]
async fn remote_chain_is_one_job() {
    let d = TestFns::default();
    let mut cmds = vec![c("s0", "echo@b", json!(["x"]))];
    for i in 1..8 {
        cmds.push(c(
            &format!("s{i}"),
            "upper@b",
            json!([format!("s{}", i - 1)]),
        ));
    }
    let out = run(&d, cmds, Wanted::Sinks).await.expect("runs");
    assert_eq!(out, json!({"s7": "X"}));
    let jobs = d.jobs.lock().expect("lock").clone();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].0, Where::Node('b'));
    assert_eq!(jobs[0].1.len(), 8);
}

#[tokio::test]
async fn chain_crossing_nodes_splits_where_it_leaves() {
    let d = TestFns::default();
    let cmds = vec![
        c("a1", "echo@a", json!(["x"])),
        c("a2", "upper@a", json!(["a1"])),
        c("h", "echos", json!(["a2"])),
        c("b1", "echos@b", json!(["h", "a1"])),
        c("b2", "echo@b", json!(["b1"])),
    ];
    let out = run(&d, cmds, Wanted::All).await.expect("runs");
    assert_eq!(out["b2"], json!([["X"], "x"]));
    assert_eq!(out["a1"], json!("x"));
    let jobs = d.jobs.lock().expect("lock").clone();
    let shape: Vec<(Where, usize)> = jobs.iter().map(|(w, s)| (*w, s.len())).collect();
    assert_eq!(
        shape,
        [
            (Where::Node('a'), 2),
            (Where::Here, 1),
            (Where::Node('b'), 2)
        ]
    );
}

#[tokio::test]
async fn step_waiting_on_outside_work_does_not_join_its_inputs_unit() {
    // b2 needs h, which needs b1: b2 cannot travel with b1.
    let d = TestFns::default();
    let cmds = vec![
        c("b1", "echo@b", json!([1])),
        c("h", "echo", json!(["b1"])),
        c("b2", "echos@b", json!(["b1", "h"])),
    ];
    let out = run(&d, cmds, Wanted::Sinks).await.expect("runs");
    assert_eq!(out, json!({"b2": [1, 1]}));
    assert_eq!(d.jobs.lock().expect("lock").len(), 3);
}

#[test]
fn grouping_keeps_units_acyclic() {
    let p = plan(vec![
        c("b1", "echo@b", json!([1])),
        c("h", "echo", json!(["b1"])),
        c("b2", "echos@b", json!(["b1", "h"])),
        c("b3", "echo@b", json!(["b2"])),
    ]);
    let targets: Vec<Where> = p.steps.iter().map(|s| split(&s.fun).1).collect();
    let (units, unit_of) = group(&p.steps, &p.order, &targets, |t| *t != Where::Here);
    assert_eq!(units.len(), 3);
    // b2 and b3 travel together; b2 waits for b1 and h from outside.
    assert_eq!(unit_of[2], unit_of[3]);
    assert_eq!(units[unit_of[2]].inputs, [0, 1]);
}

/// Collects reported results, in order.
#[derive(Default)]
struct Collect(Mutex<Vec<(String, Value)>>);

impl ResultSink for Collect {
    fn report<'a>(&'a self, name: &'a str, value: &'a Payload) -> BoxFuture<'a, ()> {
        self.0.lock().expect("lock").push((
            name.to_owned(),
            value.clone().into_value().expect("readable"),
        ));
        Box::pin(async {})
    }
}

impl Collect {
    fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }
}

#[tokio::test]
async fn progress_reports_every_step_once_with_its_value() {
    let d = TestFns::default();
    let seen = Collect::default();
    let cmds = vec![
        c("top", "echo", json!([1])),
        c("l", "echo", json!(["top"])),
        c("r", "echo", json!(["top"])),
        c("join", "echos", json!(["l", "r", "top"])),
    ];
    let out = execute_with_progress(plan(cmds), &d, Wanted::Sinks, Some(&seen))
        .await
        .expect("runs");
    assert_eq!(out, [("join".to_owned(), json!([1, 1, 1]).into())]);
    let mut got = seen.0.lock().expect("lock").clone();
    // `top` first, `join` last; `l` and `r` in either order.
    assert_eq!(got.first().map(|(n, _)| n.as_str()), Some("top"));
    assert_eq!(got.last(), Some(&("join".to_owned(), json!([1, 1, 1]))));
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        [
            ("join".to_owned(), json!([1, 1, 1])),
            ("l".to_owned(), json!(1)),
            ("r".to_owned(), json!(1)),
            ("top".to_owned(), json!(1)),
        ]
    );
}

#[tokio::test]
async fn progress_does_not_ship_chains() {
    let d = TestFns::default();
    let seen = Collect::default();
    let mut cmds = vec![c("s0", "echo@b", json!(["x"]))];
    for i in 1..4 {
        cmds.push(c(
            &format!("s{i}"),
            "upper@b",
            json!([format!("s{}", i - 1)]),
        ));
    }
    let out = execute_with_progress(plan(cmds), &d, Wanted::Sinks, Some(&seen))
        .await
        .expect("runs");
    assert_eq!(out, [("s3".to_owned(), json!("X").into())]);
    assert_eq!(seen.names(), ["s0", "s1", "s2", "s3"]);
    let jobs = d.jobs.lock().expect("lock").clone();
    assert_eq!(jobs.len(), 4, "one job per step when streaming: {jobs:?}");
}

#[tokio::test]
async fn progress_comes_before_later_steps_finish_and_stops_at_a_failure() {
    let d = TestFns::default();
    let seen = Arc::new(Collect::default());
    let cmds = vec![
        c("a", "echo", json!(["first"])),
        c("w", "wait", json!(["a"])),
        c("bad", "fail", json!(["w"])),
        c("never", "echo", json!(["bad"])),
    ];
    let run = {
        let (d, seen) = (d.clone(), seen.clone());
        tokio::spawn(async move {
            execute_with_progress(plan(cmds), &d, Wanted::Sinks, Some(&*seen)).await
        })
    };
    // `a` is reported while `w` still waits on the gate.
    for _ in 0..1_000 {
        if d.in_flight.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(d.in_flight.load(Ordering::SeqCst), 1, "`w` is waiting");
    assert_eq!(seen.names(), ["a"]);
    d.gate.notify_one();
    let e = run.await.expect("joins").expect_err("fails at `bad`");
    assert_eq!(e.command.as_deref(), Some("bad"));
    assert_eq!(seen.names(), ["a", "w"]);
}

/// With time paused, sleeps end exactly when due: each step's time is
/// when its result was known.
#[tokio::test(start_paused = true)]
async fn timed_runs_say_when_each_result_was_known() {
    let d = TestFns::default();
    let ms = Duration::from_millis;
    // a (10 ms) and b (30 ms) side by side; c after a (5 ms more); then a
    // chain shipped to node `n` as one job: its steps finish together.
    let cmds = vec![
        c("a", "sleep", json!([10])),
        c("b", "sleep", json!([30])),
        Command::new("c", "sleep").arg(5).arg("a"),
        Command::new("n1", "sleep@n").arg(1).arg("c"),
        Command::new("n2", "sleep@n").arg(2).arg("n1"),
    ];
    let (results, done) = execute_timed(plan(cmds), &d, Wanted::All, None)
        .await
        .expect("runs");
    let names: Vec<&str> = results.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "n1", "n2"], "step order");
    assert_eq!(done, [ms(10), ms(30), ms(15), ms(18), ms(18)]);

    // One step, and the sinks only: still a time for every step.
    let (results, done) = execute_timed(
        plan(vec![c("s", "sleep", json!([7]))]),
        &d,
        Wanted::Sinks,
        None,
    )
    .await
    .expect("runs");
    assert_eq!(results.len(), 1);
    assert_eq!(done, [ms(7)]);
    let cmds = vec![c("a", "sleep", json!([4])), c("b", "echo", json!(["a"]))];
    let (results, done) = execute_timed(plan(cmds), &d, Wanted::Sinks, None)
        .await
        .expect("runs");
    assert_eq!(results.len(), 1);
    assert_eq!(done, [ms(4), ms(4)]);
}
