//! From a request's commands to a typed dependency graph.
//!
//! The reference rule of the wire format (a top-level argument that is a
//! string equal to another command's name) is applied here, once. Everything
//! after this works on [`Arg::Ref`] and [`Arg::Value`], so a result that
//! happens to be a string equal to some command's name is never mistaken for
//! a reference.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{ErrorCode, RpcError};
use crate::payload::Payload;
use crate::protocol::ParsedCommand;

/// An argument after planning. On peer links it travels as `{"ref": 3}`
/// or `{"value": ..}`, so a value is never re-read as a reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Arg {
    /// The result of the step at this index.
    Ref(usize),
    /// A literal value.
    Value(Payload),
}

impl Arg {
    /// The value of an argument whose references were all resolved (a
    /// one-step job has none left); a stray reference reads as `null`.
    pub(crate) fn into_value(self) -> Result<Value, serde_json::Error> {
        match self {
            Arg::Value(v) => v.into_value(),
            Arg::Ref(_) => Ok(Value::Null),
        }
    }
}

/// One command, with its references resolved to step indices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Step {
    pub(crate) name: String,
    pub(crate) fun: String,
    #[serde(default)]
    pub(crate) args: Vec<Arg>,
    #[serde(default)]
    pub(crate) kwargs: Vec<(String, Arg)>,
    #[serde(default)]
    pub(crate) locs: Vec<String>,
    /// Distinct steps whose results this step needs (derived from the
    /// arguments; recomputed on receipt, never trusted from the wire).
    #[serde(skip)]
    pub(crate) deps: Vec<usize>,
}

impl Step {
    /// Every argument, positional then named.
    pub(crate) fn all_args(&self) -> impl Iterator<Item = &Arg> {
        self.args.iter().chain(self.kwargs.iter().map(|(_, a)| a))
    }
}

/// A validated request: steps, who consumes whom, and the sinks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    pub(crate) steps: Vec<Step>,
    /// For each step, the distinct steps that consume its result.
    pub(crate) dependents: Vec<Vec<usize>>,
    /// Steps no other step consumes, in request order: their results are the
    /// reply.
    pub(crate) sinks: Vec<usize>,
    /// Every step, each after all the steps it depends on.
    pub(crate) order: Vec<usize>,
}

impl Plan {
    /// Validates and plans `commands`: names unique, at least one command, at
    /// most `max_commands`, no cycle.
    pub(crate) fn new(commands: Vec<ParsedCommand>, max_commands: usize) -> Result<Self, RpcError> {
        if commands.is_empty() {
            return Err(RpcError::bad_request("request has no commands"));
        }
        if commands.len() > max_commands {
            return Err(RpcError::bad_request(format!(
                "request has {} commands; the limit is {max_commands}",
                commands.len()
            ))
            .with_details(json!({ "limit": max_commands })));
        }
        let mut refs = references(&commands)?.into_iter().peekable();
        let steps: Vec<Step> = commands
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                // Arguments are numbered as `references` numbers them:
                // positional, then named.
                let mut at = 0;
                let mut resolve = |v: Payload| {
                    let this = at;
                    at += 1;
                    match refs.next_if(|&(ci, ai, _)| ci == i && ai == this) {
                        Some((_, _, j)) => Arg::Ref(j),
                        None => Arg::Value(v),
                    }
                };
                let args = c.args.into_iter().map(&mut resolve).collect();
                let kwargs = c.kwargs.into_iter().map(|(k, v)| (k, resolve(v))).collect();
                Step {
                    args,
                    kwargs,
                    name: c.name,
                    fun: c.fun,
                    locs: c.locs,
                    deps: Vec::new(),
                }
            })
            .collect();
        Self::from_steps(steps)
    }

    /// Plans steps whose references are already typed (a sub-plan sent by a
    /// peer). Every reference must point at another step of the same list;
    /// `deps` is recomputed from the arguments.
    pub(crate) fn from_steps(mut steps: Vec<Step>) -> Result<Self, RpcError> {
        let n = steps.len();
        if n == 0 {
            return Err(RpcError::bad_request("request has no commands"));
        }
        if n == 1 {
            // A single step cannot refer to anything: no graph to build.
            let step = &mut steps[0];
            if let Some(j) = step.all_args().find_map(|a| match *a {
                Arg::Ref(j) => Some(j),
                Arg::Value(_) => None,
            }) {
                return Err(RpcError::bad_request(format!(
                    "command '{}' refers to step {j}, which does not exist",
                    step.name
                )));
            }
            step.deps.clear();
            return Ok(Self {
                steps,
                dependents: vec![Vec::new()],
                sinks: vec![0],
                order: vec![0],
            });
        }
        for (i, step) in steps.iter_mut().enumerate() {
            let mut deps = Vec::new();
            for arg in step.all_args() {
                if let Arg::Ref(j) = *arg {
                    if j >= n || j == i {
                        return Err(RpcError::bad_request(format!(
                            "command '{}' refers to step {j}, which does not exist",
                            step.name
                        )));
                    }
                    deps.push(j);
                }
            }
            deps.sort_unstable();
            deps.dedup();
            step.deps = deps;
        }
        let mut dependents = vec![Vec::new(); n];
        for (i, s) in steps.iter().enumerate() {
            for &d in &s.deps {
                dependents[d].push(i);
            }
        }
        let order = topological_order(&steps, &dependents)?;
        let sinks = (0..n).filter(|&i| dependents[i].is_empty()).collect();
        Ok(Self {
            steps,
            dependents,
            sinks,
            order,
        })
    }
}

impl Plan {
    /// Each step's depth (by index): 0 for a step that references none,
    /// else one more than the deepest step it references. Steps of one
    /// depth form a topological *level*, as the original Python server ran
    /// them: a level's steps depend only on earlier levels.
    pub(crate) fn depths(&self) -> Vec<usize> {
        let mut depths = vec![0; self.steps.len()];
        for &i in &self.order {
            depths[i] = self.steps[i]
                .deps
                .iter()
                .map(|&d| depths[d] + 1)
                .max()
                .unwrap_or(0);
        }
        depths
    }
}

/// Up to this many commands, names are looked up by scanning them (no
/// hash map to build).
const FEW_COMMANDS: usize = 8;

/// Where the references of `commands` are, in order: `(command, argument,
/// command referred to)`, arguments numbered positional first, then named
/// (in the map's order). The reference rule: a top-level argument that is a
/// string equal to *another* command's name (a command's own name is a
/// plain value: there is no result to substitute yet). Fails when two
/// commands share a name.
fn references(commands: &[ParsedCommand]) -> Result<Vec<(usize, usize, usize)>, RpcError> {
    let n = commands.len();
    let duplicate = |c: &ParsedCommand| {
        Err(RpcError::new(
            ErrorCode::DuplicateName,
            format!("more than one command is named '{}'", c.name),
        )
        .with_command(c.name.clone()))
    };
    let index = if n <= FEW_COMMANDS {
        for (i, c) in commands.iter().enumerate() {
            if commands[..i].iter().any(|d| d.name == c.name) {
                return duplicate(c);
            }
        }
        None
    } else {
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(n);
        for (i, c) in commands.iter().enumerate() {
            if index.insert(c.name.as_str(), i).is_some() {
                return duplicate(c);
            }
        }
        Some(index)
    };
    let mut refs = Vec::new();
    if n == 1 {
        return Ok(refs);
    }
    let find = |name: &str| match &index {
        Some(index) => index.get(name).copied(),
        None => commands.iter().position(|c| c.name == name),
    };
    for (i, c) in commands.iter().enumerate() {
        let values = c.args.iter().chain(c.kwargs.iter().map(|(_, v)| v));
        for (at, v) in values.enumerate() {
            if let Some(s) = v.as_string()
                && let Some(j) = find(&s)
                && j != i
            {
                refs.push((i, at, j));
            }
        }
    }
    Ok(refs)
}

/// Kahn's algorithm; when steps are left over, names one cycle among them.
fn topological_order(steps: &[Step], dependents: &[Vec<usize>]) -> Result<Vec<usize>, RpcError> {
    let mut indegree: Vec<usize> = steps.iter().map(|s| s.deps.len()).collect();
    let mut ready: Vec<usize> = (0..steps.len())
        .rev()
        .filter(|&i| indegree[i] == 0)
        .collect();
    let mut order = Vec::with_capacity(steps.len());
    while let Some(i) = ready.pop() {
        order.push(i);
        for &d in &dependents[i] {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                ready.push(d);
            }
        }
    }
    if order.len() == steps.len() {
        return Ok(order);
    }
    // Every left-over step has a left-over dependency, so walking
    // dependencies from any of them must revisit a step: that loop is a cycle.
    let start = (0..steps.len())
        .find(|&i| indegree[i] > 0)
        .unwrap_or_default();
    let mut seen_at = vec![usize::MAX; steps.len()];
    let mut path = Vec::new();
    let mut at = start;
    while seen_at[at] == usize::MAX {
        seen_at[at] = path.len();
        path.push(at);
        at = steps[at]
            .deps
            .iter()
            .copied()
            .find(|&d| indegree[d] > 0)
            .unwrap_or(start);
    }
    let mut cycle: Vec<&str> = path[seen_at[at]..]
        .iter()
        .rev()
        .map(|&i| steps[i].name.as_str())
        .collect();
    let names = cycle.clone();
    cycle.push(cycle[0]);
    Err(RpcError::new(
        ErrorCode::Cycle,
        format!("commands form a cycle: {}", cycle.join(" -> ")),
    )
    .with_details(json!({ "cycle": names })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Command;

    fn cmd(name: &str, fun: &str, args: Value) -> Command {
        Command::new(name, fun).args(args.as_array().cloned().unwrap_or_default())
    }

    fn plan(cmds: Vec<Command>) -> Result<Plan, RpcError> {
        Plan::new(cmds.into_iter().map(Into::into).collect(), 1000)
    }

    fn names<'a>(p: &'a Plan, idx: &[usize]) -> Vec<&'a str> {
        idx.iter().map(|&i| p.steps[i].name.as_str()).collect()
    }

    #[test]
    fn references_become_typed_and_sinks_are_unconsumed_steps() {
        let p = plan(vec![
            cmd("|first", "echo", json!(["hi there!"])),
            cmd("|second", "echo", json!(["|first"])),
            cmd("|third", "echos", json!(["|first", "AND ME TOO"])),
        ])
        .expect("valid");
        assert_eq!(p.steps[1].args, [Arg::Ref(0)]);
        assert_eq!(
            p.steps[2].args,
            [Arg::Ref(0), Arg::Value(json!("AND ME TOO").into())]
        );
        assert_eq!(names(&p, &p.sinks), ["|second", "|third"]);
    }

    #[test]
    fn independent_command_is_a_sink_too() {
        // The original returned only the last level here (`c`); every sink
        // is returned instead.
        let p = plan(vec![
            cmd("a", "echo", json!([1])),
            cmd("b", "echo", json!([2])),
            cmd("c", "echo", json!(["a"])),
        ])
        .expect("valid");
        assert_eq!(names(&p, &p.sinks), ["b", "c"]);
    }

    #[test]
    fn depths_are_the_original_levels() {
        // The five reference examples' last one: a chain with a shortcut.
        let p = plan(vec![
            cmd("|4th", "echo", json!(["|third"])),
            cmd("|first", "echo", json!(["hi there!"])),
            cmd("|second", "echo", json!(["|first"])),
            cmd(
                "|third",
                "echos",
                json!(["|first", "|second", "AND ME TOO"]),
            ),
        ])
        .expect("valid");
        assert_eq!(p.depths(), [3, 0, 1, 2]);
        // Independent commands share level 0; a command is one level below
        // its deepest input, however shallow its others are.
        let p = plan(vec![
            cmd("a", "echo", json!([1])),
            cmd("b", "echo", json!([2])),
            cmd("c", "echo", json!(["a"])),
            cmd("d", "echos", json!(["c", "b"])),
            Command::new("e", "f").kwarg("x", "a"),
        ])
        .expect("valid");
        assert_eq!(p.depths(), [0, 0, 1, 2, 1]);
        let one = plan(vec![cmd("a", "echo", json!([1]))]).expect("valid");
        assert_eq!(one.depths(), [0]);
    }

    #[test]
    fn kwargs_references_and_nested_strings() {
        let p = plan(vec![
            cmd("a", "echo", json!([1])),
            Command::new("b", "f")
                .kwarg("x", "a")
                .arg(json!(["a"]))
                .arg(json!({"k": "a"})),
        ])
        .expect("valid");
        assert_eq!(p.steps[1].kwargs, [("x".to_owned(), Arg::Ref(0))]);
        // Nested values are not searched.
        assert_eq!(p.steps[1].args[0], Arg::Value(json!(["a"]).into()));
        assert_eq!(p.steps[1].deps, [0]);
    }

    #[test]
    fn many_commands_follow_the_same_rules() {
        // Past FEW_COMMANDS, names are looked up in a map instead of
        // scanned: the same references, the same errors.
        let mut cmds: Vec<Command> = (0..FEW_COMMANDS + 2)
            .map(|i| cmd(&format!("c{i}"), "echo", json!([i])))
            .collect();
        cmds.push(
            Command::new("last", "f")
                .arg("c0")
                .arg("last")
                .kwarg("k", "c3")
                .kwarg("v", "nobody"),
        );
        let p = plan(cmds.clone()).expect("valid");
        let last = p.steps.last().expect("steps");
        assert_eq!(last.args, [Arg::Ref(0), Arg::Value(json!("last").into())]);
        assert_eq!(
            last.kwargs,
            [
                ("k".to_owned(), Arg::Ref(3)),
                ("v".to_owned(), Arg::Value(json!("nobody").into()))
            ]
        );
        assert_eq!(last.deps, [0, 3]);
        cmds.push(cmd("c5", "echo", json!([])));
        let e = plan(cmds).expect_err("duplicate");
        assert_eq!(e.code, ErrorCode::DuplicateName);
        assert_eq!(e.command.as_deref(), Some("c5"));
    }

    #[test]
    fn own_name_is_a_value_not_a_reference() {
        let p = plan(vec![cmd("a", "echo", json!(["a"]))]).expect("valid");
        assert_eq!(p.steps[0].args, [Arg::Value(json!("a").into())]);
    }

    #[test]
    fn diamond_has_shared_input_once() {
        let p = plan(vec![
            cmd("top", "echo", json!([1])),
            cmd("l", "echo", json!(["top"])),
            cmd("r", "echo", json!(["top"])),
            cmd("join", "echos", json!(["l", "r", "top", "top"])),
        ])
        .expect("valid");
        assert_eq!(p.steps[3].deps, [0, 1, 2]);
        assert_eq!(p.dependents[0], [1, 2, 3]);
        assert_eq!(names(&p, &p.sinks), ["join"]);
    }

    #[test]
    fn typed_steps_with_bad_references_are_rejected() {
        let step = |args: Vec<Arg>| Step {
            name: "s".into(),
            fun: "echo".into(),
            args,
            kwargs: Vec::new(),
            locs: Vec::new(),
            deps: Vec::new(),
        };
        assert!(Plan::from_steps(vec![step(vec![Arg::Ref(5)])]).is_err());
        assert!(Plan::from_steps(vec![step(vec![Arg::Ref(0)])]).is_err());
        let ok = Plan::from_steps(vec![step(vec![]), step(vec![Arg::Ref(0)])]).expect("valid");
        assert_eq!(ok.steps[1].deps, [0]);
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let e = plan(vec![
            cmd("a", "echo", json!([])),
            cmd("a", "echo", json!([])),
        ])
        .expect_err("duplicate");
        assert_eq!(e.code, ErrorCode::DuplicateName);
        assert_eq!(e.command.as_deref(), Some("a"));
    }

    #[test]
    fn cycle_names_its_commands() {
        let e = plan(vec![
            cmd("free", "echo", json!([0])),
            cmd("x", "echo", json!(["z"])),
            cmd("y", "echo", json!(["x", "free"])),
            cmd("z", "echo", json!(["y"])),
            cmd("tail", "echo", json!(["z"])),
        ])
        .expect_err("cycle");
        assert_eq!(e.code, ErrorCode::Cycle);
        let cycle: Vec<String> =
            serde_json::from_value(e.details.expect("details")["cycle"].clone()).expect("names");
        let mut sorted = cycle.clone();
        sorted.sort();
        assert_eq!(sorted, ["x", "y", "z"]);
        assert!(
            e.message.starts_with("commands form a cycle: "),
            "{}",
            e.message
        );
    }

    #[test]
    fn two_cycle_is_found() {
        let e = plan(vec![
            cmd("a", "echo", json!(["b"])),
            cmd("b", "echo", json!(["a"])),
        ])
        .expect_err("cycle");
        assert_eq!(e.code, ErrorCode::Cycle);
    }

    #[test]
    fn empty_and_oversized_requests_are_rejected() {
        assert_eq!(plan(vec![]).expect_err("empty").code, ErrorCode::BadRequest);
        let many = (0..3)
            .map(|i| cmd(&i.to_string(), "echo", json!([])).into())
            .collect();
        assert_eq!(
            Plan::new(many, 2).expect_err("too many").code,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn long_chain_plans_in_linear_order() {
        let mut cmds = vec![cmd("c0", "echo", json!([0]))];
        for i in 1..1000 {
            cmds.push(cmd(
                &format!("c{i}"),
                "echo",
                json!([format!("c{}", i - 1)]),
            ));
        }
        let p = plan(cmds).expect("valid");
        assert_eq!(names(&p, &p.sinks), ["c999"]);
        assert_eq!(p.order, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn order_puts_every_step_after_its_inputs() {
        // Commands may name later commands.
        let p = plan(vec![
            cmd("c", "echos", json!(["b", "a"])),
            cmd("b", "echo", json!(["a"])),
            cmd("a", "echo", json!([1])),
        ])
        .expect("valid");
        let pos = |i: usize| p.order.iter().position(|&x| x == i).expect("in order");
        for (i, s) in p.steps.iter().enumerate() {
            for &d in &s.deps {
                assert!(pos(d) < pos(i));
            }
        }
        assert_eq!(p.order.len(), 3);
    }
}
