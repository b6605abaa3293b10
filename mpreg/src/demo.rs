//! The five reference requests of the original mpreg project, with the
//! results they must give. `mpreg client URL demo` and the `echo_cluster`
//! example run them; they also make a quick smoke test of any node.
//!
//! ```no_run
//! # async fn doc() -> Result<(), mpreg::Error> {
//! let client = mpreg::Client::connect("ws://127.0.0.1:7773").await?;
//! for example in mpreg::demo::reference_examples() {
//!     let results = client.send(example.request.clone()).await?;
//!     assert_eq!(serde_json::Value::Object(results.into_map()), example.expected);
//! }
//! # Ok(()) }
//! ```

use serde_json::{Value, json};

use crate::protocol::{Command, Request};

/// One reference request and the reply it must give.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Example {
    /// The request.
    pub request: Request,
    /// The `r` object the reply must carry.
    pub expected: Value,
}

fn example(cmds: &[(&str, &str, Value)], expected: Value) -> Example {
    Example {
        request: cmds
            .iter()
            .map(|(name, fun, args)| {
                Command::new(*name, *fun).args(args.as_array().cloned().unwrap_or_default())
            })
            .collect(),
        expected,
    }
}

/// The five reference examples, in order.
///
/// ```
/// let examples = mpreg::demo::reference_examples();
/// assert_eq!(examples.len(), 5);
/// assert_eq!(examples[0].expected, serde_json::json!({"first": "hi there!"}));
/// ```
pub fn reference_examples() -> Vec<Example> {
    let first = ("|first", "echo", json!(["hi there!"]));
    let second = ("|second", "echo", json!(["|first"]));
    vec![
        example(
            &[("first", "echo", json!(["hi there!"]))],
            json!({"first": "hi there!"}),
        ),
        example(
            &[
                ("first", "echo", json!(["hi there!"])),
                ("second", "echo", json!(["first"])),
            ],
            json!({"second": "hi there!"}),
        ),
        example(
            &[
                first.clone(),
                second.clone(),
                ("|third", "echos", json!(["|first", "AND ME TOO"])),
            ],
            json!({"|second": "hi there!", "|third": ["hi there!", "AND ME TOO"]}),
        ),
        example(
            &[
                first.clone(),
                second.clone(),
                (
                    "|third",
                    "echos",
                    json!(["|first", "|second", "AND ME TOO"]),
                ),
            ],
            json!({"|third": ["hi there!", "hi there!", "AND ME TOO"]}),
        ),
        example(
            &[
                first,
                second,
                (
                    "|third",
                    "echos",
                    json!(["|first", "|second", "AND ME TOO"]),
                ),
                ("|4th", "echo", json!(["|third"])),
            ],
            json!({"|4th": ["hi there!", "hi there!", "AND ME TOO"]}),
        ),
    ]
}
