//! Hostile input: property tests over random frames and random requests
//! (names, references, cycles, sizes), deep nesting, and a concurrent mix of
//! good and bad traffic; through the pure parser and planner, a node in
//! process, and raw WebSocket frames.
//!
//! What must hold: nothing panics or hangs, every frame gets exactly one
//! reply, every failure is a structured error with a known code, and every
//! success is exactly what an independent model of the protocol
//! (`docs/PROTOCOL.md`) computes. Case counts are bounded so the whole file
//! stays fast; hang guards are generous timeouts, never timing assertions.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use common::RawWs;
use mpreg::{Command, ErrorCode, NodeHandle, Request, RpcError};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::{Map, Value, json};
use tokio::runtime::Runtime;
use tokio_tungstenite::tungstenite::Message;

/// A generous hang guard for one request or one reply.
const HANG: Duration = Duration::from_secs(30);

/// Bounded cases, and no regression files written next to the sources.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs a property with an explicit runner (for properties that drive a
/// node on a runtime owned by the test).
fn check<S: Strategy>(
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let mut runner = TestRunner::new(config(cases));
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

// ---------------------------------------------------------------------------
// The independent model: request shape, references, cycles, built-ins.
// ---------------------------------------------------------------------------

/// The documented request shape, checked without the library:
/// `Some(number of commands)` when `v` is a request the node must accept.
fn model_parse(v: &Value) -> Option<usize> {
    let outer = v.as_object()?;
    if outer.get("role").is_some_and(|r| r != "rpc") {
        return None;
    }
    let body = match outer.get("rpc") {
        Some(Value::Object(inner)) => inner,
        Some(_) => return None,
        None => outer,
    };
    if !matches!(body.get("u"), Some(Value::String(_) | Value::Number(_))) {
        return None;
    }
    let cmds = body.get("cmds")?.as_array()?;
    if !cmds.iter().all(model_command) {
        return None;
    }
    match body.get("timeout_ms") {
        None | Some(Value::Null) => {}
        Some(t) => {
            t.as_u64()?;
        }
    }
    match body.get("return_intermediate_results") {
        None | Some(Value::Null | Value::Bool(_)) => {}
        Some(_) => return None,
    }
    Some(cmds.len())
}

/// A command is an object with string `name` and `fun`, and optional array
/// `args`, object `kwargs`, array-of-strings `locs`.
fn model_command(c: &Value) -> bool {
    let Some(c) = c.as_object() else {
        return false;
    };
    c.get("name").is_some_and(Value::is_string)
        && c.get("fun").is_some_and(Value::is_string)
        && c.get("args").is_none_or(Value::is_array)
        && c.get("kwargs").is_none_or(Value::is_object)
        && c.get("locs")
            .is_none_or(|l| l.as_array().is_some_and(|l| l.iter().all(Value::is_string)))
}

/// Serde's derived `Deserialize` also reads a struct from a sequence, so the
/// node accepts `["name", "fun", [args], {kwargs}, [locs]]` as a command
/// although the protocol only documents objects (see
/// `array_form_commands_are_rejected`). Recognised here so the shape
/// properties test everything else strictly.
fn is_sequence_form_command(c: &Value) -> bool {
    let Some(items) = c.as_array() else {
        return false;
    };
    (2..=5).contains(&items.len())
        && items[0].is_string()
        && items[1].is_string()
        && items.get(2).is_none_or(Value::is_array)
        && items.get(3).is_none_or(Value::is_object)
        && items
            .get(4)
            .is_none_or(|l| l.as_array().is_some_and(|l| l.iter().all(Value::is_string)))
}

/// Whether `v` uses the undocumented array form for some command.
fn uses_sequence_form(v: &Value) -> bool {
    let body = match v.get("rpc") {
        Some(inner @ Value::Object(_)) => inner,
        _ => v,
    };
    body.get("cmds")
        .and_then(Value::as_array)
        .is_some_and(|cmds| cmds.iter().any(is_sequence_form_command))
}

/// A request's reference graph, computed from the commands alone.
#[derive(Debug, Clone)]
struct Graph {
    names: Vec<String>,
    index: HashMap<String, usize>,
    /// `deps[i]`: the commands whose results command `i` reads (sorted).
    deps: Vec<Vec<usize>>,
}

impl Graph {
    /// The graph of commands with distinct names: an argument or kwarg value
    /// that is a string equal to *another* command's name is an edge.
    fn of(cmds: &[Command]) -> Self {
        let names: Vec<String> = cmds.iter().map(|c| c.name.clone()).collect();
        let index: HashMap<String, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        let deps = cmds
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let set: BTreeSet<usize> = c
                    .args
                    .iter()
                    .chain(c.kwargs.values())
                    .filter_map(|v| v.as_str().and_then(|s| index.get(s).copied()))
                    .filter(|&j| j != i)
                    .collect();
                set.into_iter().collect()
            })
            .collect();
        Self { names, index, deps }
    }

    /// Commands in an order where each comes after its inputs (iterative
    /// depth-first search), or `None` if the references form a cycle.
    fn topological(&self) -> Option<Vec<usize>> {
        let n = self.deps.len();
        // 0: unseen, 1: on the current path, 2: done.
        let mut state = vec![0u8; n];
        let mut order = Vec::with_capacity(n);
        for root in 0..n {
            if state[root] != 0 {
                continue;
            }
            state[root] = 1;
            let mut stack = vec![(root, 0usize)];
            while let Some(top) = stack.last_mut() {
                let v = top.0;
                if let Some(&d) = self.deps[v].get(top.1) {
                    top.1 += 1;
                    match state[d] {
                        0 => {
                            state[d] = 1;
                            stack.push((d, 0));
                        }
                        1 => return None,
                        _ => {}
                    }
                } else {
                    state[v] = 2;
                    order.push(v);
                    stack.pop();
                }
            }
        }
        Some(order)
    }

    /// Commands no other command reads.
    fn sinks(&self) -> Vec<usize> {
        let mut read = vec![false; self.deps.len()];
        for d in self.deps.iter().flatten() {
            read[*d] = true;
        }
        (0..read.len()).filter(|&i| !read[i]).collect()
    }

    /// Checks that `details.cycle` of a `cycle` error names a real cycle of
    /// this graph: distinct known names, each consecutive pair (and the last
    /// with the first) an edge, all in the same direction.
    fn check_cycle(&self, e: &RpcError) -> Result<(), String> {
        let names: Vec<String> = e
            .details
            .as_ref()
            .and_then(|d| d.get("cycle"))
            .and_then(|c| serde_json::from_value(c.clone()).ok())
            .ok_or_else(|| format!("no details.cycle list in {e:?}"))?;
        if !e.message.starts_with("commands form a cycle: ") {
            return Err(format!("cycle message: {}", e.message));
        }
        let idx: Vec<usize> = names
            .iter()
            .map(|n| {
                self.index
                    .get(n)
                    .copied()
                    .ok_or_else(|| format!("cycle names unknown command {n:?}"))
            })
            .collect::<Result<_, _>>()?;
        let distinct: BTreeSet<usize> = idx.iter().copied().collect();
        if idx.len() < 2 || distinct.len() != idx.len() {
            return Err(format!(
                "cycle {names:?} is not a loop of distinct commands"
            ));
        }
        let pairs = || (0..idx.len()).map(|k| (idx[k], idx[(k + 1) % idx.len()]));
        let forward = pairs().all(|(a, b)| self.deps[b].contains(&a));
        let backward = pairs().all(|(a, b)| self.deps[a].contains(&b));
        if forward || backward {
            Ok(())
        } else {
            Err(format!(
                "cycle {names:?} is not a cycle of the reference graph {:?}",
                self.deps
            ))
        }
    }
}

/// What planning must do with a list of commands.
#[derive(Debug)]
enum PlanModel {
    Empty,
    Duplicate(String),
    Cycle(Graph),
    Acyclic { graph: Graph, order: Vec<usize> },
}

fn model_plan(cmds: &[Command]) -> PlanModel {
    if cmds.is_empty() {
        return PlanModel::Empty;
    }
    let mut seen = BTreeSet::new();
    for c in cmds {
        if !seen.insert(c.name.as_str()) {
            return PlanModel::Duplicate(c.name.clone());
        }
    }
    let graph = Graph::of(cmds);
    match graph.topological() {
        Some(order) => PlanModel::Acyclic { graph, order },
        None => PlanModel::Cycle(graph),
    }
}

/// The reply a node must give.
#[derive(Debug)]
enum Expected {
    /// Exactly these results.
    Ok(Map<String, Value>),
    /// One of these errors (code and failing command).
    Err(Vec<(ErrorCode, Option<String>)>),
    /// A `cycle` error naming a real cycle of this graph.
    Cycle(Graph),
}

/// The datasets of the test nodes.
const NODE_DATASETS: &[&str] = &["d1"];

/// Built-ins with diagnostics on (`debug.sleep` is never generated).
const KNOWN_FUNS: &[&str] = &["echo", "echos", "debug.fail", "debug.panic"];

/// `Args::__check`: not more positional values than parameters, no unknown
/// name, no parameter both by position and by name.
fn check_params(pos: &[Value], named: &Map<String, Value>, params: &[&str]) -> bool {
    pos.len() <= params.len()
        && named.keys().all(|k| {
            params
                .iter()
                .position(|p| p == k)
                .is_some_and(|i| i >= pos.len())
        })
}

/// What a built-in returns for these (resolved) arguments.
fn model_builtin(
    fun: &str,
    pos: Vec<Value>,
    named: Map<String, Value>,
) -> Result<Value, ErrorCode> {
    let bad = Err(ErrorCode::BadArguments);
    match fun {
        "echo" if check_params(&pos, &named, &["arg"]) => {
            // Exactly one argument: by position or as `arg`.
            pos.into_iter()
                .next()
                .or_else(|| named.get("arg").cloned())
                .ok_or(ErrorCode::BadArguments)
        }
        "echos" if named.is_empty() => Ok(Value::Array(pos)),
        "debug.fail" if check_params(&pos, &named, &["message"]) => {
            match pos.first().or_else(|| named.get("message")) {
                Some(Value::String(_)) => Err(ErrorCode::HandlerFailed),
                _ => bad,
            }
        }
        "debug.panic" if check_params(&pos, &named, &[]) => Err(ErrorCode::HandlerFailed),
        _ => bad,
    }
}

/// The reply of a node (diagnostics on, datasets [`NODE_DATASETS`], only
/// built-ins) to `cmds`.
fn model_request(cmds: &[Command], intermediate: bool) -> Expected {
    let (graph, order) = match model_plan(cmds) {
        PlanModel::Empty => return Expected::Err(vec![(ErrorCode::BadRequest, None)]),
        PlanModel::Duplicate(name) => {
            return Expected::Err(vec![(ErrorCode::DuplicateName, Some(name))]);
        }
        PlanModel::Cycle(graph) => return Expected::Cycle(graph),
        PlanModel::Acyclic { graph, order } => (graph, order),
    };
    // Placement, in request order, before anything runs.
    for c in cmds {
        if !KNOWN_FUNS.contains(&c.fun.as_str()) {
            return Expected::Err(vec![(ErrorCode::UnknownFunction, Some(c.name.clone()))]);
        }
        if c.locs.iter().any(|l| !NODE_DATASETS.contains(&l.as_str())) {
            return Expected::Err(vec![(ErrorCode::NoNodeForDatasets, Some(c.name.clone()))]);
        }
    }
    // Dataflow: a command runs when all its inputs succeeded. Any command
    // that fails with all inputs ready may be the one reported.
    let mut out: Vec<Option<Result<Value, ErrorCode>>> = vec![None; cmds.len()];
    let mut failures = Vec::new();
    for &i in &order {
        if graph.deps[i]
            .iter()
            .any(|&j| !matches!(out[j], Some(Ok(_))))
        {
            continue;
        }
        let resolve = |v: &Value| -> Value {
            if let Some(s) = v.as_str()
                && let Some(&j) = graph.index.get(s)
                && j != i
                && let Some(Ok(result)) = &out[j]
            {
                return result.clone();
            }
            v.clone()
        };
        let c = &cmds[i];
        let pos = c.args.iter().map(resolve).collect();
        let named = c
            .kwargs
            .iter()
            .map(|(k, v)| (k.clone(), resolve(v)))
            .collect();
        let result = model_builtin(&c.fun, pos, named);
        if let Err(code) = result {
            failures.push((code, Some(c.name.clone())));
        }
        out[i] = Some(result);
    }
    if !failures.is_empty() {
        return Expected::Err(failures);
    }
    let wanted = if intermediate {
        (0..cmds.len()).collect()
    } else {
        graph.sinks()
    };
    Expected::Ok(
        wanted
            .into_iter()
            .map(|i| {
                let value = match &out[i] {
                    Some(Ok(v)) => v.clone(),
                    _ => Value::Null,
                };
                (graph.names[i].clone(), value)
            })
            .collect(),
    )
}

/// Every error explains itself, except that a handler's own error carries
/// the handler's text (`debug.fail("")` fails with an empty message).
fn has_message(e: &RpcError) -> bool {
    !e.message.is_empty() || e.code == ErrorCode::HandlerFailed
}

/// Compares a reply with the model.
fn check_outcome(
    expected: &Expected,
    got: &Result<Map<String, Value>, RpcError>,
) -> Result<(), TestCaseError> {
    match (expected, got) {
        (Expected::Ok(want), Ok(r)) => prop_assert_eq!(r, want),
        (Expected::Err(allowed), Err(e)) => {
            prop_assert!(
                allowed.contains(&(e.code, e.command.clone())),
                "error {:?} is not one of {:?}",
                e,
                allowed
            );
            prop_assert!(has_message(e), "error without message: {:?}", e);
        }
        (Expected::Cycle(graph), Err(e)) => {
            prop_assert_eq!(e.code, ErrorCode::Cycle, "{:?}", e);
            graph.check_cycle(e).map_err(TestCaseError::fail)?;
        }
        (want, got) => {
            return Err(TestCaseError::fail(format!(
                "expected {want:?}, got {got:?}"
            )));
        }
    }
    Ok(())
}

/// Validates the shape of one reply frame and reads its outcome.
fn read_reply(reply: &Value) -> Result<Result<Map<String, Value>, RpcError>, String> {
    let obj = reply.as_object().ok_or("reply is not an object")?;
    if obj.get("role") != Some(&json!("rpc-response")) {
        return Err(format!("reply role in {reply}"));
    }
    if !matches!(
        obj.get("u"),
        Some(Value::Null | Value::String(_) | Value::Number(_))
    ) {
        return Err(format!("reply id in {reply}"));
    }
    match (obj.get("r"), obj.get("error")) {
        (Some(Value::Object(r)), Some(Value::Null)) => Ok(Ok(r.clone())),
        (Some(Value::Null), Some(e @ Value::Object(_))) => {
            let e: RpcError =
                serde_json::from_value(e.clone()).map_err(|x| format!("{x}: error in {reply}"))?;
            if e.code == ErrorCode::Unknown || !has_message(&e) {
                return Err(format!("unstructured error in {reply}"));
            }
            Ok(Err(e))
        }
        _ => Err(format!("reply has neither `r` nor `error`: {reply}")),
    }
}

// ---------------------------------------------------------------------------
// Generators.
// ---------------------------------------------------------------------------

/// Field names of the protocol and a few others, so random objects often
/// look like requests.
const KEYS: &[&str] = &[
    "role",
    "rpc",
    "u",
    "cmds",
    "name",
    "fun",
    "args",
    "kwargs",
    "locs",
    "timeout_ms",
    "return_intermediate_results",
    "a",
];

fn key() -> BoxedStrategy<String> {
    prop_oneof![
        4 => select(KEYS).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
    .boxed()
}

fn json_leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-2i64..3).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        select(&["rpc", "echo", "echos", "a", "b", "", "rpc-response"][..]).prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ]
    .boxed()
}

/// Any JSON value of bounded depth and size.
fn json_value() -> BoxedStrategy<Value> {
    json_leaf()
        .prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..6).prop_map(Value::Array),
                vec((key(), inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
        .boxed()
}

/// `Some(valid)` mostly; sometimes absent, sometimes any value.
fn field(valid: BoxedStrategy<Value>) -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        20 => valid.prop_map(Some),
        1 => Just(None),
        1 => json_value().prop_map(Some),
    ]
    .boxed()
}

fn object(fields: Vec<(&str, Option<Value>)>) -> Value {
    Value::Object(
        fields
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
            .collect(),
    )
}

/// Something shaped like a command, often valid, often slightly off.
fn command_like() -> BoxedStrategy<Value> {
    let name = select(&["a", "b", "c"][..]).prop_map(Value::from).boxed();
    let fun = select(&["echo", "echos", "nope"][..])
        .prop_map(Value::from)
        .boxed();
    let args = vec(json_leaf(), 0..3).prop_map(Value::Array).boxed();
    let kwargs = vec((key(), json_leaf()), 0..2)
        .prop_map(|kv| Value::Object(kv.into_iter().collect()))
        .boxed();
    let locs = vec(select(&["d1", "d2"][..]).prop_map(Value::from), 0..2)
        .prop_map(Value::Array)
        .boxed();
    let object_form = (
        field(name),
        field(fun),
        field(args),
        field(kwargs),
        field(locs),
    )
        .prop_map(|(n, f, a, k, l)| {
            object(vec![
                ("name", n),
                ("fun", f),
                ("args", a),
                ("kwargs", k),
                ("locs", l),
            ])
        });
    prop_oneof![
        16 => object_form,
        1 => json_value(),
        1 => vec(json_leaf(), 0..4).prop_map(Value::Array),
    ]
    .boxed()
}

/// Something shaped like a request in either envelope, often valid.
fn request_like() -> BoxedStrategy<Value> {
    let role = prop_oneof![4 => Just(json!("rpc")), 1 => json_leaf()].boxed();
    let u = prop_oneof![
        3 => Just(json!("req-1")),
        3 => any::<u32>().prop_map(Value::from),
        1 => json_leaf(),
    ]
    .boxed();
    let cmds = vec(command_like(), 0..3).prop_map(Value::Array).boxed();
    let timeout = prop_oneof![
        4 => (0u64..100_000).prop_map(Value::from),
        1 => json_leaf(),
    ]
    .boxed();
    let rir = any::<bool>().prop_map(Value::from).boxed();
    (
        field(role),
        field(u),
        field(cmds),
        field(timeout),
        field(rir),
        0u8..8,
    )
        .prop_map(|(role, u, cmds, timeout, rir, envelope)| {
            let body = vec![
                ("u", u),
                ("cmds", cmds),
                ("timeout_ms", timeout),
                ("return_intermediate_results", rir),
            ];
            match envelope {
                0 => object(vec![("role", role), ("rpc", Some(object(body)))]),
                1 => object(vec![("role", role), ("rpc", Some(json!([1])))]),
                _ => {
                    let mut flat = body;
                    flat.push(("role", role));
                    object(flat)
                }
            }
        })
        .boxed()
}

/// An argument before names are assigned.
#[derive(Debug, Clone)]
enum RawArg {
    /// A string naming command `k` of the name pool (which may not exist).
    Ref(usize),
    /// A literal value.
    Lit(Value),
    /// A name nested in an array or object: never a reference.
    Nested(usize),
}

/// A command before names are assigned.
#[derive(Debug, Clone)]
struct RawCmd {
    name: usize,
    fun: usize,
    args: Vec<RawArg>,
    kwargs: Vec<(usize, RawArg)>,
    locs: usize,
    /// Position after shuffling.
    key: u32,
}

/// How names are drawn.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// From a small alphabet, with replacement: duplicates are common.
    Dup,
    /// Distinct; references to any command (or to no command): cycles are
    /// common.
    Distinct,
    /// Distinct; references only to commands built earlier, then shuffled:
    /// never a cycle.
    Dag,
    /// Distinct; each command also references the one built before it, the
    /// first the last: a ring (unless there is only one command, whose own
    /// name is a plain value), plus random references.
    Ring,
}

fn literal() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        select(&["hi there!", "AND ME TOO", "zz", ""][..]).prop_map(Value::from),
        Just(json!([1, "two", null])),
        Just(json!({"k": "v"})),
    ]
    .boxed()
}

fn raw_arg() -> BoxedStrategy<RawArg> {
    prop_oneof![
        3 => any::<usize>().prop_map(RawArg::Ref),
        2 => literal().prop_map(RawArg::Lit),
        1 => any::<usize>().prop_map(RawArg::Nested),
    ]
    .boxed()
}

fn raw_cmd() -> BoxedStrategy<RawCmd> {
    let kwargs = prop_oneof![
        3 => Just(Vec::new()),
        1 => vec((any::<usize>(), raw_arg()), 1..3),
    ];
    (
        any::<usize>(),
        any::<usize>(),
        vec(raw_arg(), 0..4),
        kwargs,
        any::<usize>(),
        any::<u32>(),
    )
        .prop_map(|(name, fun, args, kwargs, locs, key)| RawCmd {
            name,
            fun,
            args,
            kwargs,
            locs,
            key,
        })
        .boxed()
}

fn raw_request(max_cmds: usize) -> BoxedStrategy<(Mode, Vec<RawCmd>)> {
    let mode = prop_oneof![
        1 => Just(Mode::Dup),
        1 => Just(Mode::Distinct),
        1 => Just(Mode::Ring),
        3 => Just(Mode::Dag),
    ];
    // Small requests half the time, so hostile commands still run.
    let cmds = prop_oneof![vec(raw_cmd(), 0..6), vec(raw_cmd(), 0..max_cmds)];
    (mode, cmds).boxed()
}

/// Functions and datasets a generated request draws from.
#[derive(Debug)]
struct Vocab {
    /// Repeated entries weigh more.
    funs: &'static [&'static str],
    locs: &'static [&'static [&'static str]],
    /// Whether commands get kwargs, and `echo` sometimes several arguments.
    hostile_args: bool,
}

const PLAN_VOCAB: Vocab = Vocab {
    funs: &["echo", "f", "g"],
    locs: &[&[], &["d1"]],
    hostile_args: true,
};

/// Requests that should mostly succeed: the model computes their values.
const CLEAN_VOCAB: Vocab = Vocab {
    funs: &["echo", "echos"],
    locs: &[&[], &[], &["d1"]],
    hostile_args: false,
};

/// Requests with failing handlers, panics, unknown functions and datasets,
/// and bad arguments.
const HOSTILE_VOCAB: Vocab = Vocab {
    funs: &[
        "echo",
        "echo",
        "echo",
        "echo",
        "echos",
        "echos",
        "echos",
        "echos",
        "debug.fail",
        "debug.panic",
        "no.such.function",
    ],
    locs: &[
        &[],
        &[],
        &[],
        &[],
        &[],
        &[],
        &[],
        &[],
        &[],
        &[],
        &["d1"],
        &["d1"],
        &["d2"],
        &["d1", "d2"],
    ],
    hostile_args: true,
};

/// Clean or hostile vocabularies for node tests, half and half.
fn node_vocab() -> BoxedStrategy<&'static Vocab> {
    prop_oneof![Just(&CLEAN_VOCAB), Just(&HOSTILE_VOCAB)].boxed()
}

const SMALL_NAMES: &[&str] = &["a", "b", "c", "d", "|first", "x y", ""];
const KWARG_NAMES: &[&str] = &["arg", "message", "x", "a"];

/// Turns raw commands into commands: names per `mode`, references resolved
/// to names, then shuffled.
fn build(mode: Mode, raws: &[RawCmd], vocab: &Vocab) -> Vec<Command> {
    let n = raws.len();
    let pool: Vec<String> = match mode {
        Mode::Dup => SMALL_NAMES.iter().map(|s| (*s).to_owned()).collect(),
        Mode::Distinct | Mode::Dag | Mode::Ring => (0..n + 2).map(|i| format!("n{i}")).collect(),
    };
    let target = |i: usize, k: usize| -> String {
        match mode {
            Mode::Dag if i == 0 => pool[n + k % 2].clone(),
            Mode::Dag => pool[k % i].clone(),
            Mode::Dup | Mode::Distinct | Mode::Ring => pool[k % pool.len()].clone(),
        }
    };
    let value = |i: usize, a: &RawArg| -> Value {
        match a {
            RawArg::Ref(k) => Value::String(target(i, *k)),
            RawArg::Lit(v) => v.clone(),
            RawArg::Nested(k) if k % 2 == 0 => json!([target(i, *k)]),
            RawArg::Nested(k) => json!({ "k": target(i, *k) }),
        }
    };
    let mut cmds: Vec<(u32, Command)> = raws
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let name = match mode {
                Mode::Dup => pool[raw.name % pool.len()].clone(),
                Mode::Distinct | Mode::Dag | Mode::Ring => pool[i].clone(),
            };
            let fun = vocab.funs[raw.fun % vocab.funs.len()];
            let mut args: Vec<Value> = raw.args.iter().map(|a| value(i, a)).collect();
            if let Mode::Ring = mode {
                args.push(Value::String(pool[(i + n - 1) % n].clone()));
            }
            // Mostly the arguments the function takes (hostile vocabularies
            // keep the random ones a quarter of the time).
            if !vocab.hostile_args || raw.name % 4 != 0 {
                match fun {
                    "echo" => args.truncate(1),
                    "debug.panic" => args.clear(),
                    "debug.fail" => args = vec![json!("boom")],
                    _ => {}
                }
            }
            let mut c = Command::new(name, fun)
                .args(args)
                .datasets(vocab.locs[raw.locs % vocab.locs.len()].iter().copied());
            for (k, a) in raw.kwargs.iter().filter(|_| vocab.hostile_args) {
                c = c.kwarg(KWARG_NAMES[k % KWARG_NAMES.len()], value(i, a));
            }
            (raw.key, c)
        })
        .collect();
    cmds.sort_by_key(|(key, _)| *key);
    cmds.into_iter().map(|(_, c)| c).collect()
}

fn request_of(cmds: Vec<Command>, intermediate: bool) -> Request {
    cmds.into_iter()
        .fold(Request::new(), Request::cmd)
        .return_intermediate_results(intermediate)
}

/// The commands as wire JSON.
fn cmds_json(cmds: &[Command]) -> Value {
    serde_json::to_value(cmds).expect("commands encode")
}

/// One frame sent by a hostile client.
#[derive(Debug, Clone)]
enum RawFrame {
    Text(String),
    Binary(Vec<u8>),
}

/// A valid request with a few bytes replaced, inserted or removed.
fn mutated_request() -> BoxedStrategy<Vec<u8>> {
    let base = json!({"role": "rpc", "u": "m", "cmds": [
        {"name": "a", "fun": "echo", "args": ["hi there!"], "locs": []},
        {"name": "b", "fun": "echos", "args": ["a", 2], "kwargs": {}},
    ]})
    .to_string()
    .into_bytes();
    vec((any::<usize>(), any::<u8>(), 0u8..3), 1..5)
        .prop_map(move |edits| {
            let mut bytes = base.clone();
            for (at, byte, op) in edits {
                let at = at % (bytes.len() + 1);
                match op {
                    0 if at < bytes.len() => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ => bytes.push(byte),
                }
            }
            bytes
        })
        .boxed()
}

fn raw_frame() -> BoxedStrategy<RawFrame> {
    prop_oneof![
        vec(any::<u8>(), 0..200).prop_map(RawFrame::Binary),
        any::<String>().prop_map(RawFrame::Text),
        mutated_request().prop_map(RawFrame::Binary),
        mutated_request().prop_map(|b| RawFrame::Text(String::from_utf8_lossy(&b).into_owned())),
        request_like().prop_map(|v| RawFrame::Text(v.to_string())),
        json_value().prop_map(|v| RawFrame::Binary(v.to_string().into_bytes())),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------
// 1. Pure properties: the parser and the planner, no sockets.
// ---------------------------------------------------------------------------

/// Parses `bytes` with the library and compares with the model.
fn check_frame(bytes: &[u8]) -> Result<(), TestCaseError> {
    let got = mpreg::__bench::parse_frame(bytes);
    let model = serde_json::from_slice::<Value>(bytes)
        .ok()
        .filter(|v| !uses_sequence_form(v))
        .and_then(|v| model_parse(&v));
    match (&got, model) {
        (Ok(n), Some(m)) => prop_assert_eq!(*n, m),
        (Err(e), None) => {
            prop_assert_eq!(e.code, ErrorCode::BadRequest, "{:?}", e);
            prop_assert!(!e.message.is_empty());
        }
        (_, None)
            if serde_json::from_slice::<Value>(bytes).is_ok_and(|v| uses_sequence_form(&v)) => {}
        (got, model) => {
            return Err(TestCaseError::fail(format!(
                "parse_frame gave {got:?}, the model {model:?}"
            )));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn random_bytes_parse_to_a_request_or_bad_request(bytes in vec(any::<u8>(), 0..512)) {
        check_frame(&bytes)?;
    }

    #[test]
    fn mutated_requests_parse_to_a_request_or_bad_request(bytes in mutated_request()) {
        check_frame(&bytes)?;
    }

    #[test]
    fn random_json_is_accepted_only_in_the_request_shape(
        v in prop_oneof![1 => json_value(), 3 => request_like()]
    ) {
        check_frame(v.to_string().as_bytes())?;
    }

    #[test]
    fn planning_matches_the_reference_model((mode, raws) in raw_request(30)) {
        let cmds = build(mode, &raws, &PLAN_VOCAB);
        let model = model_plan(&cmds);
        let got = mpreg::__bench::plan(cmds);
        match (&model, &got) {
            (PlanModel::Empty, Err(e)) => prop_assert_eq!(e.code, ErrorCode::BadRequest),
            (PlanModel::Duplicate(name), Err(e)) => {
                prop_assert_eq!(e.code, ErrorCode::DuplicateName);
                prop_assert_eq!(e.command.as_ref(), Some(name));
            }
            (PlanModel::Cycle(graph), Err(e)) => {
                prop_assert_eq!(e.code, ErrorCode::Cycle, "{:?}", e);
                graph.check_cycle(e).map_err(TestCaseError::fail)?;
            }
            (PlanModel::Acyclic { graph, .. }, Ok(sinks)) => {
                prop_assert_eq!(*sinks, graph.sinks().len());
            }
            (model, got) => {
                return Err(TestCaseError::fail(format!("model {model:?}, plan gave {got:?}")));
            }
        }
    }
}

#[test]
fn deeply_nested_frames_are_bad_requests_on_a_small_stack() {
    // The parser must not recurse per nesting level in mpreg's own code;
    // serde_json stops at its limit of 128 levels. A small stack proves the
    // process survives. (128 levels of serde_json's parse take about
    // 256 KiB in an unoptimized build, about 2 KiB a level, which left no
    // room; unbounded recursion through 1,000,000 levels would take
    // gigabytes.)
    let worker = std::thread::Builder::new()
        .stack_size(512 << 10)
        .spawn(|| {
            for depth in [10_000usize, 1_000_000] {
                let frames = [
                    "[".repeat(depth),
                    format!("{}1{}", "[".repeat(depth), "]".repeat(depth)),
                    "{\"a\":".repeat(depth),
                    format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth)),
                    format!(
                        r#"{{"u":"deep","cmds":[{{"name":"a","fun":"echo","args":[{}{}]}}]}}"#,
                        "[".repeat(depth),
                        "]".repeat(depth)
                    ),
                ];
                for frame in frames {
                    let e = mpreg::__bench::parse_frame(frame.as_bytes())
                        .expect_err("too deep to be a request");
                    assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}");
                }
            }
            // Nesting under the limit is an ordinary request.
            let ok = format!(
                r#"{{"u":"deep","cmds":[{{"name":"a","fun":"echo","args":[{}{}]}}]}}"#,
                "[".repeat(100),
                "]".repeat(100)
            );
            assert_eq!(mpreg::__bench::parse_frame(ok.as_bytes()).ok(), Some(1));
        })
        .expect("spawn a small-stack thread");
    worker.join().expect("no panic, no stack overflow");
}

#[test]
fn array_form_commands_are_rejected() {
    for frame in [
        r#"{"u":"x","cmds":[["a","echo",["hi"]]]}"#,
        r#"{"u":"x","cmds":[["a","echo"]]}"#,
        r#"{"role":"rpc","rpc":{"u":"x","cmds":[["a","echos",[1],{},[]]]}}"#,
    ] {
        let got = mpreg::__bench::parse_frame(frame.as_bytes());
        assert_eq!(
            got.as_ref().map_err(|e| e.code),
            Err(ErrorCode::BadRequest),
            "{frame} gave {got:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Through a node: in process, and raw WebSocket frames.
// ---------------------------------------------------------------------------

/// Sends a request in process, with a hang guard.
async fn send_in_process(
    node: &NodeHandle,
    request: Request,
) -> Result<Result<Map<String, Value>, RpcError>, TestCaseError> {
    match tokio::time::timeout(HANG, node.send(request)).await {
        Err(_) => Err(TestCaseError::fail("request hung")),
        Ok(Ok(results)) => Ok(Ok(results.into_map())),
        Ok(Err(mpreg::Error::Rpc(e))) => Ok(Err(e)),
        Ok(Err(other)) => Err(TestCaseError::fail(format!(
            "not a structured error: {other}"
        ))),
    }
}

#[test]
fn random_requests_in_process_match_the_model() {
    let rt = runtime();
    let node = rt
        .block_on(
            mpreg::Node::builder()
                .dial_out_only()
                .without_linked_functions()
                .diagnostics(true)
                .datasets(NODE_DATASETS.iter().copied())
                .start(),
        )
        .expect("node starts");
    check(
        256,
        (raw_request(30), node_vocab(), any::<bool>()),
        |((mode, raws), vocab, intermediate)| {
            let cmds = build(mode, &raws, vocab);
            let expected = model_request(&cmds, intermediate);
            let got = rt.block_on(send_in_process(&node, request_of(cmds, intermediate)))?;
            check_outcome(&expected, &got)
        },
    );
    rt.block_on(node.shutdown());
}

/// Sends one hostile frame.
async fn send_frame(ws: &mut RawWs, frame: &RawFrame) {
    match frame {
        RawFrame::Text(text) => ws.send_text(text).await,
        RawFrame::Binary(bytes) => ws.send_binary(bytes).await,
    }
}

/// The next reply frame as JSON, or why there is none.
async fn next_reply(ws: &mut RawWs) -> Result<Value, TestCaseError> {
    match ws.next_frame().await {
        Some(Ok(Message::Text(text))) => serde_json::from_str(text.as_str())
            .map_err(|e| TestCaseError::fail(format!("reply is not JSON ({e}): {text}"))),
        other => Err(TestCaseError::fail(format!(
            "expected a reply frame, got {other:?}"
        ))),
    }
}

#[test]
fn random_frames_each_get_one_reply_and_the_connection_stays_usable() {
    let rt = runtime();
    let node = rt.block_on(common::start_node(
        common::builder().datasets(NODE_DATASETS.iter().copied()),
    ));
    let url = node.url().expect("node listens");
    // Deep nesting over the wire too: an error, and the connection stays.
    rt.block_on(async {
        let mut ws = RawWs::connect(&url).await;
        for depth in [200usize, 100_000] {
            let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            ws.send_text(&deep).await;
            let reply = ws.recv_json().await;
            common::err_of(&reply, &Value::Null, "bad_request");
        }
        let reply = ws
            .request(&common::flat(
                "after-deep",
                json!([common::cmd("e", "echo", json!([1]))]),
            ))
            .await;
        assert_eq!(common::ok_r(&reply, &json!("after-deep")), json!({"e": 1}));
        ws.close().await;
    });
    check(
        64,
        (
            vec(raw_frame(), 1..8),
            raw_request(12),
            node_vocab(),
            any::<bool>(),
            any::<bool>(),
            any::<u64>(),
        ),
        |(frames, (mode, raws), vocab, intermediate, nested, tag)| {
            let cmds = build(mode, &raws, vocab);
            let expected = model_request(&cmds, intermediate);
            let u = json!(format!("sentinel-{tag}"));
            // mpreg's meaning of `return_intermediate_results` (the marker).
            let mut request = json!({
                "mpreg": 1,
                "u": u,
                "cmds": cmds_json(&cmds),
                "return_intermediate_results": intermediate,
            });
            if nested {
                request = json!({"role": "rpc", "rpc": request});
            }
            rt.block_on(async {
                // A new connection per case: the node keeps accepting.
                let mut ws = RawWs::connect(&url).await;
                for f in &frames {
                    send_frame(&mut ws, f).await;
                }
                ws.send_json(&request).await;
                // Replies come in completion order: exactly one per frame,
                // one of them the sentinel's.
                let mut sentinel = Vec::new();
                for _ in 0..=frames.len() {
                    let reply = next_reply(&mut ws).await?;
                    let outcome = read_reply(&reply).map_err(TestCaseError::fail)?;
                    if reply["u"] == u {
                        sentinel.push(outcome);
                    }
                }
                prop_assert_eq!(sentinel.len(), 1, "sentinel replies: {:?}", sentinel);
                check_outcome(&expected, &sentinel[0])?;
                // No stray reply is left: the next one answers the next
                // request.
                let after = ws
                    .request(&common::flat(
                        "after",
                        json!([common::cmd("e", "echos", json!(["x", 1]))]),
                    ))
                    .await;
                prop_assert_eq!(&after["u"], &json!("after"), "{}", after);
                prop_assert_eq!(&after["r"], &json!({"e": ["x", 1]}), "{}", after);
                ws.close().await;
                Ok(())
            })
        },
    );
    rt.block_on(node.shutdown());
}

// ---------------------------------------------------------------------------
// 3. Concurrency and hostility mixed.
// ---------------------------------------------------------------------------

/// Checks one reply of the mix: the reply, its id, the request's number.
type Check = fn(&Value, &Value, u64);

/// One message of the mix and the reply it must get.
enum Mixed {
    /// A frame with a readable id: exactly one reply with that id.
    Request {
        frame: RawFrame,
        u: Value,
        check: Check,
        n: u64,
    },
    /// A frame without a readable id: a `bad_request` reply with `u: null`.
    Garbage(RawFrame),
}

fn check_echo(reply: &Value, u: &Value, n: u64) {
    let r = common::ok_r(reply, u);
    assert_eq!(r, json!({"b": [n, "a-was", n], "c": {"k": "b"}}), "{reply}");
}

fn check_panic(reply: &Value, u: &Value, _: u64) {
    let e = common::err_of(reply, u, "handler_failed");
    assert_eq!(e["command"], "p", "{reply}");
}

fn check_bad_request(reply: &Value, u: &Value, _: u64) {
    common::err_of(reply, u, "bad_request");
}

fn check_duplicate(reply: &Value, u: &Value, _: u64) {
    let e = common::err_of(reply, u, "duplicate_name");
    assert_eq!(e["command"], "a", "{reply}");
}

fn check_cycle(reply: &Value, u: &Value, _: u64) {
    let e = common::err_of(reply, u, "cycle");
    let mut names: Vec<String> =
        serde_json::from_value(e["details"]["cycle"].clone()).expect("cycle names");
    names.sort();
    assert_eq!(names, ["x", "y"], "{reply}");
}

fn valid_cmds(n: u64) -> Value {
    json!([
        {"name": "a", "fun": "echo", "args": [n]},
        {"name": "b", "fun": "echos", "args": ["a", "a-was", "a"]},
        {"name": "c", "fun": "echo", "args": [{"k": "b"}]},
    ])
}

/// The `i`th message of task `t`.
fn mixed(t: u64, i: u64) -> Mixed {
    let u = json!(format!("t{t}-{i}"));
    let text = |v: Value| RawFrame::Text(v.to_string());
    let (frame, check): (RawFrame, Check) = match (t + i) % 8 {
        0 | 1 => (text(common::flat(u.clone(), valid_cmds(i))), check_echo),
        2 => (
            RawFrame::Binary(
                common::nested(u.clone(), valid_cmds(i))
                    .to_string()
                    .into_bytes(),
            ),
            check_echo,
        ),
        3 => (
            text(common::flat(
                u.clone(),
                json!([
                    {"name": "a", "fun": "echo", "args": [1]},
                    {"name": "p", "fun": "debug.panic", "args": []},
                    {"name": "c", "fun": "echos", "args": ["a", "p"]},
                ]),
            )),
            check_panic,
        ),
        4 => (
            text(json!({"mpreg": 1, "u": u, "cmds": "nope"})),
            check_bad_request,
        ),
        5 => (
            text(common::flat(
                u.clone(),
                json!([
                    common::cmd("a", "echo", json!([1])),
                    common::cmd("a", "echo", json!([2]))
                ]),
            )),
            check_duplicate,
        ),
        6 => (
            text(common::flat(
                u.clone(),
                json!([
                    common::cmd("x", "echo", json!(["y"])),
                    common::cmd("y", "echo", json!(["x"]))
                ]),
            )),
            check_cycle,
        ),
        _ => {
            return Mixed::Garbage(if i.is_multiple_of(2) {
                RawFrame::Binary(vec![0xff, 0x00, t as u8, i as u8])
            } else {
                RawFrame::Text(format!("{{not json {t} {i}"))
            });
        }
    };
    Mixed::Request {
        frame,
        u,
        check,
        n: i,
    }
}

/// Sends the mix on one connection (pipelined) and checks every reply.
async fn hostile_connection(url: String, t: u64, count: u64) {
    let mut ws = RawWs::connect(&url).await;
    let mut expected: HashMap<String, (Check, u64)> = HashMap::new();
    let mut garbage = 0usize;
    for i in 0..count {
        match mixed(t, i) {
            Mixed::Request { frame, u, check, n } => {
                send_frame(&mut ws, &frame).await;
                expected.insert(u.as_str().expect("string id").to_owned(), (check, n));
            }
            Mixed::Garbage(frame) => {
                send_frame(&mut ws, &frame).await;
                garbage += 1;
            }
        }
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut nulls = 0usize;
    for _ in 0..count {
        let reply = ws.recv_json().await;
        match &reply["u"] {
            Value::Null => {
                common::err_of(&reply, &Value::Null, "bad_request");
                nulls += 1;
            }
            Value::String(u) => {
                let (check, n) = expected
                    .get(u)
                    .unwrap_or_else(|| panic!("reply for an unknown request: {reply}"));
                check(&reply, &reply["u"], *n);
                *seen.entry(u.clone()).or_default() += 1;
            }
            other => panic!("unexpected id {other} in {reply}"),
        }
    }
    assert_eq!(nulls, garbage, "one reply per garbage frame (task {t})");
    for u in expected.keys() {
        assert_eq!(seen.get(u), Some(&1), "exactly one reply for {u}");
    }
    // Still open and in sync.
    let u = json!(format!("t{t}-last"));
    let reply = ws.request(&common::flat(u.clone(), valid_cmds(7))).await;
    check_echo(&reply, &u, 7);
    ws.close().await;
}

/// The same mix minus garbage, in process.
async fn hostile_in_process(node: Arc<NodeHandle>, t: u64, count: u64) {
    for i in 0..count {
        let Mixed::Request {
            frame: RawFrame::Text(text),
            u,
            check,
            n,
        } = mixed(t, i)
        else {
            continue;
        };
        let v: Value = serde_json::from_str(&text).expect("JSON");
        let body = v.get("rpc").unwrap_or(&v);
        let Ok(cmds) = serde_json::from_value::<Vec<Command>>(body["cmds"].clone()) else {
            continue; // `cmds` is not a list: only meaningful on the wire.
        };
        let reply =
            match common::guard("in-process request", node.send(request_of(cmds, false))).await {
                Ok(r) => json!({"u": u, "r": r.into_map(), "error": null}),
                Err(mpreg::Error::Rpc(e)) => json!({"u": u, "r": null, "error": e}),
                Err(other) => panic!("not a structured error: {other}"),
            };
        check(&reply, &u, n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mix_of_valid_malformed_and_panicking_requests() {
    let node = Arc::new(common::start_default().await);
    let url = node.url().expect("node listens");
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..20u64 {
        if t % 5 == 4 {
            tasks.spawn(hostile_in_process(node.clone(), t, 40));
        } else {
            tasks.spawn(hostile_connection(url.clone(), t, 40));
        }
    }
    while let Some(done) = common::guard("hostile tasks", tasks.join_next()).await {
        done.expect("task succeeds");
    }
    // The node still serves new connections.
    let mut ws = RawWs::connect(&url).await;
    let reply = ws.request(&common::flat("fresh", valid_cmds(3))).await;
    check_echo(&reply, &json!("fresh"), 3);
    ws.close().await;
    Arc::try_unwrap(node)
        .expect("no other handle")
        .shutdown()
        .await;
}

// ---------------------------------------------------------------------------
// 4. Results nested deeper than JSON parsers allow (bugs).
// ---------------------------------------------------------------------------

/// A chain of `n` `echos` commands: each wraps the previous result in one
/// more array, so the last result is nested `n` deep.
fn echos_chain(n: usize) -> Vec<Command> {
    let mut cmds = vec![Command::new("c0", "echos").arg(1)];
    cmds.extend((1..n).map(|i| Command::new(format!("c{i}"), "echos").arg(format!("c{}", i - 1))));
    cmds
}

/// Set in the child process of `deep_result_nesting_does_not_crash_the_node`.
const CHILD_ENV: &str = "MPREG_HOSTILE_DEEP_CHILD";

#[test]
fn deep_result_nesting_does_not_crash_the_node() {
    // A stack overflow aborts the process, so the node runs in a child.
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "deep_result_nesting_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .expect("run the child");
    assert!(
        out.status.success(),
        "the node process died ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "subprocess helper of deep_result_nesting_does_not_crash_the_node"]
fn deep_result_nesting_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    runtime().block_on(async {
        let node = common::start_default().await;
        let url = node.url().expect("node listens");
        let mut ws = RawWs::connect(&url).await;
        let cmds = echos_chain(100_000);
        ws.send_json(&json!({"u": "deep", "cmds": cmds_json(&cmds)}))
            .await;
        // Any reply will do (the result, or an error saying it is too deep),
        // as long as the node survives to give it and to serve the next.
        match ws.next_frame().await {
            Some(Ok(Message::Text(text))) => {
                assert!(text.as_str().starts_with("{\"role\":\"rpc-response\""));
                assert!(text.as_str().contains("\"u\":\"deep\""));
            }
            other => panic!("expected a reply, got {other:?}"),
        }
        let mut fresh = RawWs::connect(&url).await;
        let reply = fresh
            .request(&common::flat(
                "next",
                json!([common::cmd("e", "echo", json!([1]))]),
            ))
            .await;
        assert_eq!(common::ok_r(&reply, &json!("next")), json!({"e": 1}));
    });
}

#[tokio::test]
async fn rust_client_does_not_hang_on_a_deeply_nested_result() {
    let node = common::start_default().await;
    let client = common::client(&node).await;
    let request = request_of(echos_chain(150), false);
    let outcome = tokio::time::timeout(Duration::from_secs(10), client.send(request)).await;
    // Ok or an error (Json/Protocol) are both fine; waiting forever is not.
    assert!(outcome.is_ok(), "Client::send never returned");
    node.shutdown().await;
}

// ---------------------------------------------------------------------------
// 5. Limits: extreme timeouts, too many requests in flight.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn extreme_timeouts_on_the_wire_get_a_reply() {
    let node = common::start_default().await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    let cmds = json!([common::cmd("a", "echo", json!([1]))]);
    for t in [json!(u64::MAX), json!(0), json!(1)] {
        let reply = ws
            .request(&json!({"u": "t", "timeout_ms": t, "cmds": cmds}))
            .await;
        // Done in time, or a timeout error: either way, one reply.
        match read_reply(&reply).expect("a well-formed reply") {
            Ok(r) => assert_eq!(Value::Object(r), json!({"a": 1}), "{reply}"),
            Err(e) => assert_eq!(e.code, ErrorCode::Timeout, "{reply}"),
        }
    }
    for t in [json!(-1), json!(1.5), json!(1e30), json!("5000")] {
        let reply = ws
            .request(&json!({"mpreg": 1, "u": "t", "timeout_ms": t, "cmds": cmds}))
            .await;
        common::err_of(&reply, &json!("t"), "bad_request");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn in_process_request_with_huge_timeout_does_not_panic() {
    let node = mpreg::Node::builder()
        .dial_out_only()
        .without_linked_functions()
        .start()
        .await
        .expect("node starts");
    for timeout in [Duration::MAX, Duration::from_secs(u64::MAX / 2)] {
        let request = request_of(vec![Command::new("a", "echo").arg(1)], false).timeout(timeout);
        let results = node.send(request).await.expect("no deadline in practice");
        assert_eq!(results.value("a"), Some(&json!(1)));
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_connection_still_answers_every_frame_once() {
    let node = common::start_node(common::builder().max_inflight_per_connection(2)).await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    let mut ids = Vec::new();
    let mut garbage = 0;
    for i in 0..40u64 {
        if i % 5 == 4 {
            ws.send_binary(&[0xfe, i as u8]).await;
            garbage += 1;
            continue;
        }
        let u = format!("o{i}");
        let cmds = json!([
            common::cmd("s", "debug.sleep", json!([5])),
            common::cmd("e", "echos", json!(["s", i])),
        ]);
        ws.feed_json(&common::flat(u.clone(), cmds)).await;
        ids.push(u);
    }
    ws.flush().await;
    let mut seen: HashMap<Value, usize> = HashMap::new();
    for _ in 0..40 {
        let reply = ws.recv_json().await;
        let u = reply["u"].clone();
        match read_reply(&reply).expect("a well-formed reply") {
            Ok(r) => {
                let i: u64 = u.as_str().expect("id")[1..].parse().expect("number");
                assert_eq!(Value::Object(r), json!({"e": [5, i]}), "{reply}");
            }
            Err(e) if e.code == ErrorCode::Overloaded => {
                assert_eq!(e.details, Some(json!({"limit": 2})), "{reply}");
            }
            Err(e) => {
                assert_eq!(e.code, ErrorCode::BadRequest, "{reply}");
                assert_eq!(u, Value::Null, "{reply}");
            }
        }
        *seen.entry(u).or_default() += 1;
    }
    assert_eq!(seen.remove(&Value::Null), Some(garbage));
    let expected: HashMap<Value, usize> = ids.into_iter().map(|u| (json!(u), 1)).collect();
    assert_eq!(seen, expected, "exactly one reply per request");
    // Once the burst is over, the connection serves again.
    let reply = ws
        .request(&common::flat(
            "calm",
            json!([common::cmd("e", "echo", json!([1]))]),
        ))
        .await;
    assert_eq!(common::ok_r(&reply, &json!("calm")), json!({"e": 1}));
    ws.close().await;
    node.shutdown().await;
}
