//! Local functions: what `#[mpreg::rpc]` registers through `inventory`, what
//! [`Function`] registers at runtime, and the table a node serves from.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::context::{Context, Dataset};
use crate::error::RpcError;
use crate::metrics::FunctionMetrics;

/// The arguments of one call: positional (`args`) and by parameter name
/// (`kwargs`), with references already replaced by their results.
///
/// Handlers made by `#[mpreg::rpc]` decode these into typed parameters; a
/// [`Function`] registered at runtime receives them as they are.
///
/// ```
/// use mpreg::Args;
/// use serde_json::json;
///
/// let args = Args::new(vec![json!(1)], json!({"b": 2}).as_object().cloned().unwrap());
/// assert_eq!(args.positional(), &[json!(1)]);
/// assert_eq!(args.named()["b"], json!(2));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Args {
    positional: Vec<Value>,
    named: Map<String, Value>,
    /// The call's context; `None` for arguments built by hand.
    context: Option<Context>,
}

/// Arguments are equal when their values are (whatever their context).
impl PartialEq for Args {
    fn eq(&self, other: &Self) -> bool {
        self.positional == other.positional && self.named == other.named
    }
}

impl Args {
    /// Arguments from positional values and named values.
    pub fn new(positional: Vec<Value>, named: Map<String, Value>) -> Self {
        Self {
            positional,
            named,
            context: None,
        }
    }

    /// The same arguments, for a call with `context`.
    pub(crate) fn with_context(mut self, context: Context) -> Self {
        self.context = Some(context);
        self
    }

    /// The context of the call, when a node passed these arguments to a
    /// handler (for [`Function`] handlers; `#[mpreg::rpc]` functions take a
    /// `ctx: Context` parameter instead).
    pub fn context(&self) -> Option<&Context> {
        self.context.as_ref()
    }

    /// The positional arguments.
    pub fn positional(&self) -> &[Value] {
        &self.positional
    }

    /// The arguments given by name.
    pub fn named(&self) -> &Map<String, Value> {
        &self.named
    }

    /// Takes the arguments apart.
    pub fn into_parts(self) -> (Vec<Value>, Map<String, Value>) {
        (self.positional, self.named)
    }

    /// Checks the arguments against a parameter list: not more positional
    /// values than parameters, no unknown names, no parameter given twice.
    #[doc(hidden)]
    pub fn __check(&self, params: &[Param]) -> Result<(), RpcError> {
        if self.positional.len() > params.len() {
            return Err(RpcError::bad_arguments(format!(
                "expected at most {} argument(s) ({}), got {}",
                params.len(),
                ParamList(params),
                self.positional.len()
            )));
        }
        for key in self.named.keys() {
            match params.iter().position(|p| p.name == key) {
                None => {
                    return Err(RpcError::bad_arguments(format!(
                        "unknown argument `{key}`; parameters are ({})",
                        ParamList(params)
                    )));
                }
                Some(i) if i < self.positional.len() => {
                    return Err(RpcError::bad_arguments(format!(
                        "argument `{key}` given both by position and by name"
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The call's context, for a `Context` parameter.
    #[doc(hidden)]
    pub fn __context(&self) -> Result<Context, RpcError> {
        self.context.clone().ok_or_else(no_context)
    }

    /// The state of the dataset the command named, for a `Dataset<T>`
    /// parameter.
    #[doc(hidden)]
    pub fn __dataset<T: Any + Send + Sync>(&self) -> Result<Dataset<T>, RpcError> {
        self.context.as_ref().ok_or_else(no_context)?.dataset()
    }

    /// Takes parameter `index` (named `name`, of Rust type `ty`) from the
    /// positional arguments, or else from the named ones, and decodes it.
    ///
    /// A missing argument decodes from `null`, so `Option<T>` parameters are
    /// optional; any other missing argument is a `bad_arguments` error.
    #[doc(hidden)]
    pub fn __take<T: DeserializeOwned + 'static>(
        &mut self,
        index: usize,
        param: &Param,
    ) -> Result<T, RpcError> {
        let value = match self.positional.get_mut(index) {
            Some(v) => Some(v.take()),
            None => self.named.remove(param.name),
        };
        // A `Value` parameter takes the argument as it is: decoding it
        // through serde would rebuild the whole tree (costly for big ones).
        if TypeId::of::<T>() == TypeId::of::<Value>() {
            let boxed: Box<dyn Any> = Box::new(value.unwrap_or(Value::Null));
            // The types are the same: the downcast cannot fail.
            return boxed
                .downcast::<T>()
                .map(|v| *v)
                .map_err(|_| RpcError::new(crate::ErrorCode::Internal, "argument type mismatch"));
        }
        let present = value.is_some();
        serde_json::from_value(value.unwrap_or(Value::Null)).map_err(|e| {
            if present {
                RpcError::bad_arguments(format!(
                    "argument `{}` is not a valid `{}`: {e}",
                    param.name, param.ty
                ))
            } else {
                RpcError::bad_arguments(format!(
                    "missing argument `{}` (expected `{}`)",
                    param.name, param.ty
                ))
            }
        })
    }
}

/// A handler asked for the context of arguments built by hand.
fn no_context() -> RpcError {
    RpcError::new(
        crate::ErrorCode::Internal,
        "this handler takes a context, but was called without one",
    )
}

struct ParamList<'a>(&'a [Param]);

impl fmt::Display for ParamList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}: {}", p.name, p.ty)?;
        }
        Ok(())
    }
}

/// One parameter of a registered function: its name (used for `kwargs`) and
/// its Rust type as written (used in error messages and descriptions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param {
    /// The parameter's name.
    pub name: &'static str,
    /// The parameter's type, as written in the source.
    pub ty: &'static str,
}

impl Param {
    /// A parameter description.
    pub const fn new(name: &'static str, ty: &'static str) -> Self {
        Self { name, ty }
    }
}

/// What a type-erased handler returns.
pub(crate) type HandlerResult = Result<Value, RpcError>;

/// A type-erased handler shared by every call of one function.
pub(crate) type Handler = Arc<dyn Fn(Args) -> BoxFuture<'static, HandlerResult> + Send + Sync>;

/// A function registered at compile time by `#[mpreg::rpc]`, collected with
/// `inventory`. Built only by the macro; not part of the stable API.
#[doc(hidden)]
#[derive(Debug)]
pub struct Registration {
    pub(crate) name: &'static str,
    pub(crate) datasets: &'static [&'static str],
    pub(crate) params: &'static [Param],
    pub(crate) returns: &'static str,
    pub(crate) doc: &'static str,
    pub(crate) idempotent: bool,
    pub(crate) handler: fn(Args) -> BoxFuture<'static, HandlerResult>,
}

impl Registration {
    /// A registration with no datasets, no parameters and no doc.
    pub const fn new(
        name: &'static str,
        handler: fn(Args) -> BoxFuture<'static, HandlerResult>,
    ) -> Self {
        Self {
            name,
            datasets: &[],
            params: &[],
            returns: "()",
            doc: "",
            idempotent: false,
            handler,
        }
    }

    /// Sets the datasets the function always has.
    pub const fn datasets(mut self, datasets: &'static [&'static str]) -> Self {
        self.datasets = datasets;
        self
    }

    /// Sets the parameter list.
    pub const fn params(mut self, params: &'static [Param]) -> Self {
        self.params = params;
        self
    }

    /// Sets the return type as written.
    pub const fn returns(mut self, returns: &'static str) -> Self {
        self.returns = returns;
        self
    }

    /// Sets the doc comment.
    pub const fn doc(mut self, doc: &'static str) -> Self {
        self.doc = doc;
        self
    }

    /// Marks the function as safe to retry.
    pub const fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = idempotent;
        self
    }

    /// The registered name.
    #[doc(hidden)]
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The datasets the function always has.
    #[doc(hidden)]
    pub fn dataset_names(&self) -> &'static [&'static str] {
        self.datasets
    }

    /// The parameter list.
    #[doc(hidden)]
    pub fn param_list(&self) -> &'static [Param] {
        self.params
    }

    /// The return type as written.
    #[doc(hidden)]
    pub fn return_type(&self) -> &'static str {
        self.returns
    }

    /// The doc comment.
    #[doc(hidden)]
    pub fn doc_text(&self) -> &'static str {
        self.doc
    }

    /// Whether the function is safe to retry.
    #[doc(hidden)]
    pub fn is_idempotent(&self) -> bool {
        self.idempotent
    }

    /// Calls the handler.
    #[doc(hidden)]
    pub fn call(&self, args: Args) -> BoxFuture<'static, HandlerResult> {
        (self.handler)(args)
    }
}

inventory::collect!(Registration);

/// A function to serve: a name, the datasets it always has, and a handler.
///
/// `#[mpreg::rpc]` functions become `Function`s automatically. Build one by
/// hand to register a closure at runtime with
/// [`NodeBuilder::function`](crate::NodeBuilder::function):
///
/// ```
/// use mpreg::{Args, Function, RpcError};
/// use serde_json::{json, Value};
///
/// let add = Function::new("add", |args: Args| async move {
///     let sum: i64 = args.positional().iter().filter_map(Value::as_i64).sum();
///     Ok::<_, RpcError>(json!(sum))
/// })
/// .datasets(["numbers"])
/// .doc("Adds its positional integer arguments.");
/// assert_eq!(add.name(), "add");
/// ```
#[derive(Clone)]
pub struct Function {
    pub(crate) name: String,
    pub(crate) datasets: BTreeSet<String>,
    pub(crate) params: Vec<Param>,
    pub(crate) returns: String,
    pub(crate) doc: String,
    pub(crate) idempotent: bool,
    /// Offered to peers (false: only requests entering at this node run it).
    pub(crate) advertised: bool,
    pub(crate) handler: Handler,
    /// Its calls on this node; each registry gives it its own (see
    /// [`Registry::new`]).
    pub(crate) metrics: Arc<FunctionMetrics>,
}

impl fmt::Debug for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Function")
            .field("name", &self.name)
            .field("datasets", &self.datasets)
            .field("idempotent", &self.idempotent)
            .finish_non_exhaustive()
    }
}

impl Function {
    /// A function named `name` whose handler receives the raw [`Args`].
    pub fn new<F, Fut>(name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Args) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, RpcError>> + Send + 'static,
    {
        Self {
            name: name.into(),
            datasets: BTreeSet::new(),
            params: Vec::new(),
            returns: String::new(),
            doc: String::new(),
            idempotent: false,
            advertised: true,
            handler: Arc::new(move |args| Box::pin(handler(args))),
            metrics: Arc::default(),
        }
    }

    /// Adds datasets that this function always has (on top of the node's).
    pub fn datasets<I, S>(mut self, datasets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.datasets.extend(datasets.into_iter().map(Into::into));
        self
    }

    /// Sets the description shown to operators.
    pub fn doc(mut self, doc: impl Into<String>) -> Self {
        self.doc = doc.into();
        self
    }

    /// Describes the parameters and the return type (for operators and for
    /// `kwargs`; the handler still receives the raw [`Args`]).
    pub fn params(mut self, params: &[Param], returns: impl Into<String>) -> Self {
        self.params = params.to_vec();
        self.returns = returns.into();
        self
    }

    /// Describes the return type.
    pub fn returns(mut self, returns: impl Into<String>) -> Self {
        self.returns = returns.into();
        self
    }

    /// Marks the function as safe to run again after a failure.
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    /// Serves the function only to requests that enter at this node: it is
    /// not offered to peers, so a request is never routed elsewhere for it
    /// (for functions that describe the node they run on).
    pub fn local_only(mut self) -> Self {
        self.advertised = false;
        self
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn from_registration(r: &Registration) -> Self {
        let handler = r.handler;
        Self {
            name: r.name.to_owned(),
            datasets: r.datasets.iter().map(|d| (*d).to_owned()).collect(),
            params: r.params.to_vec(),
            returns: r.returns.to_owned(),
            doc: r.doc.to_owned(),
            idempotent: r.idempotent,
            advertised: true,
            handler: Arc::new(handler),
            metrics: Arc::default(),
        }
    }
}

/// Every function linked into this binary with `#[mpreg::rpc]`.
pub(crate) fn linked_functions() -> impl Iterator<Item = Function> {
    inventory::iter::<Registration>
        .into_iter()
        .map(Function::from_registration)
}

/// Why a command cannot run on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unavailable {
    /// No function of that name here.
    NoFunction,
    /// The function is here, but not with every requested dataset.
    MissingDatasets,
}

impl Unavailable {
    /// The error for a command (`fun` with datasets `locs`) that cannot run.
    pub(crate) fn error(self, fun: &str, locs: &[String]) -> RpcError {
        match self {
            Self::NoFunction => RpcError::new(
                crate::ErrorCode::UnknownFunction,
                format!("no function '{fun}' on any node"),
            ),
            Self::MissingDatasets => RpcError::new(
                crate::ErrorCode::NoNodeForDatasets,
                format!("no node has function '{fun}' with all of the datasets {locs:?}"),
            )
            .with_details(serde_json::json!({ "function": fun, "datasets": locs })),
        }
    }
}

/// The functions one node serves, each with its full dataset set (its own
/// datasets plus the node's).
#[derive(Debug, Clone, Default)]
pub(crate) struct Registry {
    functions: BTreeMap<String, Function>,
}

impl Registry {
    /// A registry of `functions`, each also given `node_datasets` and
    /// counters of its own (a `Function` given to two nodes is counted
    /// apart on each). A later function with the same name replaces an
    /// earlier one.
    pub(crate) fn new(
        functions: impl IntoIterator<Item = Function>,
        node_datasets: &BTreeSet<String>,
    ) -> Self {
        let functions = functions
            .into_iter()
            .map(|mut f| {
                f.datasets.extend(node_datasets.iter().cloned());
                f.metrics = Arc::default();
                (f.name.clone(), f)
            })
            .collect();
        Self { functions }
    }

    /// A copy with `function` added (replacing one of the same name), given
    /// the node's datasets too. A function replaced keeps counting where
    /// the one it replaces left off.
    pub(crate) fn with(&self, mut function: Function, node_datasets: &BTreeSet<String>) -> Self {
        function.datasets.extend(node_datasets.iter().cloned());
        function.metrics = self
            .functions
            .get(&function.name)
            .map_or_else(Arc::default, |old| old.metrics.clone());
        let mut functions = self.functions.clone();
        functions.insert(function.name.clone(), function);
        Self { functions }
    }

    /// A copy without the function `name`, and whether it was there.
    pub(crate) fn without(&self, name: &str) -> (Self, bool) {
        let mut functions = self.functions.clone();
        let removed = functions.remove(name).is_some();
        (Self { functions }, removed)
    }

    /// All functions, by name.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Function> {
        self.functions.values()
    }

    /// The function `fun` if it has every dataset in `datasets`.
    pub(crate) fn lookup(&self, fun: &str, datasets: &[String]) -> Result<&Function, Unavailable> {
        let f = self.functions.get(fun).ok_or(Unavailable::NoFunction)?;
        if datasets.iter().all(|d| f.datasets.contains(d)) {
            Ok(f)
        } else {
            Err(Unavailable::MissingDatasets)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PARAMS: &[Param] = &[Param::new("a", "i32"), Param::new("b", "Option<String>")];

    fn args(pos: Value, named: Value) -> Args {
        Args::new(
            pos.as_array().cloned().unwrap_or_default(),
            named.as_object().cloned().unwrap_or_default(),
        )
    }

    #[test]
    fn takes_positional_then_named() {
        let mut a = args(json!([1]), json!({"b": "x"}));
        a.__check(PARAMS).expect("valid");
        assert_eq!(a.__take::<i32>(0, &PARAMS[0]).expect("a"), 1);
        assert_eq!(
            a.__take::<Option<String>>(1, &PARAMS[1]).expect("b"),
            Some("x".into())
        );
    }

    #[test]
    fn missing_option_is_none_and_missing_value_is_an_error() {
        let mut a = args(json!([]), json!({}));
        assert_eq!(a.__take::<Option<String>>(1, &PARAMS[1]).expect("b"), None);
        let e = a.__take::<i32>(0, &PARAMS[0]).expect_err("a is required");
        assert_eq!(e.code, crate::ErrorCode::BadArguments);
        assert_eq!(e.message, "missing argument `a` (expected `i32`)");
    }

    #[test]
    fn wrong_type_names_parameter_and_type() {
        let mut a = args(json!(["nope"]), json!({}));
        let e = a.__take::<i32>(0, &PARAMS[0]).expect_err("not an i32");
        assert!(
            e.message.starts_with("argument `a` is not a valid `i32`"),
            "{}",
            e.message
        );
    }

    #[test]
    fn check_rejects_extra_unknown_and_doubled() {
        let too_many = args(json!([1, "x", 3]), json!({}));
        assert!(too_many.__check(PARAMS).is_err());
        let unknown = args(json!([]), json!({"zzz": 1}));
        let e = unknown.__check(PARAMS).expect_err("unknown");
        assert!(
            e.message.contains("unknown argument `zzz`"),
            "{}",
            e.message
        );
        let doubled = args(json!([1]), json!({"a": 1}));
        assert!(doubled.__check(PARAMS).is_err());
    }

    #[test]
    fn lookup_requires_every_dataset() {
        let f = Function::new("f", |_| async { Ok(Value::Null) }).datasets(["x"]);
        let node: BTreeSet<String> = ["y".to_owned()].into();
        let r = Registry::new([f], &node);
        assert!(r.lookup("f", &["x".into(), "y".into()]).is_ok());
        assert_eq!(
            r.lookup("f", &["z".into()]).err(),
            Some(Unavailable::MissingDatasets)
        );
        assert_eq!(r.lookup("g", &[]).err(), Some(Unavailable::NoFunction));
    }
}
