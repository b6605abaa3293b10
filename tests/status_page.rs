//! The status page in a real browser: headless Chromium loads `/` from a
//! node of a two-node cluster, runs the page's script (which polls
//! `/status.json`), and the DOM it dumps must show both nodes, the
//! functions with their datasets, and the calls made.
//!
//! Needs Debian's `chromium` package. Without it the test says
//! `skipped: chromium not installed` on stderr and passes, unless
//! `MPREG_REQUIRE_BROWSER=1` (as in `.ci/run`), which makes it fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{builder, guard, start_node};
use mpreg::Command;

/// How long one browser run may take before it is killed.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

/// Browser runs before giving up on the page showing everything.
const ATTEMPTS: usize = 4;

/// Debian's Chromium: on `PATH` as `chromium` or `chromium-browser`, or at
/// `/usr/bin/chromium`.
fn find_browser() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| [dir.join("chromium"), dir.join("chromium-browser")])
        .chain([PathBuf::from("/usr/bin/chromium")])
        .find(|candidate| candidate.is_file())
}

/// A fresh browser profile directory, removed when dropped.
struct Profile(PathBuf);

impl Profile {
    fn new(attempt: usize) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "mpreg-status-page-{}-{attempt}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("profile directory");
        Self(dir)
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loads `url` in headless Chromium and returns the DOM after the page's
/// scripts ran (for up to 5 s of virtual time). The browser is killed if it
/// runs longer than [`BROWSER_TIMEOUT`].
async fn dump_dom(browser: &Path, url: &str, attempt: usize) -> String {
    let profile = Profile::new(attempt);
    let mut command = tokio::process::Command::new(browser);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .args(["--virtual-time-budget=5000", "--dump-dom", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("chromium starts");
    let output = match tokio::time::timeout(BROWSER_TIMEOUT, child.wait_with_output()).await {
        Ok(output) => output.expect("chromium runs"),
        // Dropping the future kills the browser (kill_on_drop).
        Err(_) => panic!("chromium did not finish within {BROWSER_TIMEOUT:?}"),
    };
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    if dom.is_empty() {
        eprintln!(
            "chromium printed no DOM ({}); its stderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    dom
}

/// The markup of the table row carrying `attr="value"`.
fn row<'a>(dom: &'a str, attr: &str, value: &str) -> Option<&'a str> {
    let start = dom.find(&format!("<tr {attr}=\"{value}\""))?;
    let rest = &dom[start..];
    let end = rest.find("</tr>")?;
    Some(&rest[..end])
}

/// The number in `data-calls="N"` within `markup`.
fn calls(markup: &str) -> Option<u64> {
    let start = markup.find("data-calls=\"")? + "data-calls=\"".len();
    let rest = &markup[start..];
    rest[..rest.find('"')?].parse().ok()
}

/// What the test expects the page to show; `Err` says what is missing.
fn check(dom: &str) -> Result<u64, String> {
    if !dom.contains("id=\"self\">alpha<") {
        return Err("the serving node's name".into());
    }
    for node in ["alpha", "beta"] {
        let markup = row(dom, "data-node", node).ok_or(format!("a row for node {node}"))?;
        if !markup.contains(&format!(">{node}<")) {
            return Err(format!("node {node}'s name in its row"));
        }
    }
    let predict = row(dom, "data-function", "predict").ok_or("a row for predict")?;
    if !predict.contains("data-dataset=\"model-a\"") || !predict.contains(">model-a<") {
        return Err("predict's dataset model-a".into());
    }
    let train = row(dom, "data-function", "train").ok_or("a row for train")?;
    if !train.contains(">model-b<") || !train.contains(">beta<") {
        return Err("train with its dataset model-b on beta".into());
    }
    match calls(predict) {
        Some(n) if n > 0 => Ok(n),
        other => Err(format!("a call count > 0 for predict, got {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_the_cluster_in_a_browser() {
    let Some(browser) = find_browser() else {
        if std::env::var("MPREG_REQUIRE_BROWSER").as_deref() == Ok("1") {
            panic!(
                "chromium not installed, and MPREG_REQUIRE_BROWSER=1 requires it: install Debian's chromium package (apt-get install -y chromium)"
            );
        }
        eprintln!(
            "\n*** skipped: chromium not installed (status page browser test; set MPREG_REQUIRE_BROWSER=1 to fail instead) ***\n"
        );
        return;
    };

    let (predict, _) = common::counting("predict");
    let alpha = start_node(
        builder()
            .name("alpha")
            .function(predict.datasets(["model-a"]).doc("Predicts with model a.")),
    )
    .await;
    let (train, _) = common::counting("train");
    let beta = start_node(
        builder()
            .name("beta")
            .peers([alpha.url().expect("url")])
            .function(train.datasets(["model-b"])),
    )
    .await;
    let joined = alpha
        .wait_for(common::HANG_GUARD, |view| {
            view.nodes_with_dataset("model-b") > 0
        })
        .await;
    assert!(joined, "alpha sees beta and its functions");

    let client = common::client(&alpha).await;
    for i in 0..3 {
        let r: Vec<i64> = guard(
            "predict",
            client.call_command(Command::new("p", "predict").arg(i).dataset("model-a")),
        )
        .await
        .expect("predict");
        assert_eq!(r, [i]);
    }
    let r: Vec<i64> = guard(
        "train",
        client.call_command(Command::new("t", "train").arg(9).dataset("model-b")),
    )
    .await
    .expect("train, on beta");
    assert_eq!(r, [9]);

    let url = format!("http://{}/", alpha.local_addr().expect("listens"));
    let mut last = Err(String::from("no browser run"));
    let mut dom = String::new();
    for attempt in 0..ATTEMPTS {
        dom = dump_dom(&browser, &url, attempt).await;
        last = check(&dom);
        if last.is_ok() {
            break;
        }
    }
    match last {
        Ok(n) => assert_eq!(n, 3, "predict ran 3 times on alpha"),
        Err(missing) => panic!("the page does not show {missing}; DOM:\n{dom}"),
    }
    drop(client);
    beta.shutdown().await;
    alpha.shutdown().await;
}

#[test]
fn the_checks_find_what_they_look_for() {
    let dom = r#"<h1><span id="self">alpha</span></h1>
        <tr data-node="alpha"><td>alpha</td></tr><tr data-node="beta"><td>beta</td></tr>
        <tr data-function="predict"><td><span class="node">alpha</span><span class="dataset" data-dataset="model-a">model-a</span></td><td data-calls="3">3</td></tr>
        <tr data-function="train"><td><span>beta</span><span>model-b</span></td><td data-calls="0">–</td></tr>"#;
    assert_eq!(check(dom), Ok(3));
    assert!(check(&dom.replace("data-calls=\"3\"", "data-calls=\"0\"")).is_err());
    assert!(check(&dom.replace("model-a", "model-x")).is_err());
    assert!(check(&dom.replace("data-node=\"beta\"", "")).is_err());
}
