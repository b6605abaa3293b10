//! The `mpreg` binary: `server` prints its address once, serves, and stops
//! on SIGTERM; `client` runs calls, requests and the demo, and exits non-zero
//! with the error on failure.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_mpreg");
const GUARD: Duration = Duration::from_secs(60);

/// Starts `mpreg server` with `args`; returns the child and its URL.
async fn server(args: &[&str]) -> (Child, String) {
    server_with_env(args, &[]).await
}

/// Starts `mpreg server` with `args` and environment variables `env`.
async fn server_with_env(args: &[&str], env: &[(&str, &str)]) -> (Child, String) {
    let mut child = Command::new(BIN)
        .envs(env.iter().copied())
        .arg("server")
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mpreg server");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(GUARD, lines.next_line())
        .await
        .expect("server printed its address in time")
        .expect("read stdout")
        .expect("a line");
    let url = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    assert!(url.starts_with("ws://127.0.0.1:"), "{url}");
    assert!(!url.ends_with(":0"), "the real port is printed: {url}");
    // Nothing else is printed on stdout.
    tokio::spawn(async move {
        if let Ok(Some(extra)) = lines.next_line().await {
            panic!("unexpected stdout line {extra:?}");
        }
    });
    (child, url)
}

/// Runs `mpreg client URL args..`; returns (success, stdout, stderr).
async fn client(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(
        GUARD,
        Command::new(BIN).arg("client").arg(url).args(args).output(),
    )
    .await
    .expect("client finished in time")
    .expect("run mpreg client");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn terminate(mut child: Child) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(status.success());
    let exit = tokio::time::timeout(GUARD, child.wait())
        .await
        .expect("server stopped after SIGTERM")
        .expect("wait");
    assert!(exit.success(), "clean exit on SIGTERM: {exit:?}");
}

#[tokio::test]
async fn server_and_client_end_to_end() {
    let (child, url) = server(&[
        "--name",
        "cli-node",
        "--dataset",
        "model-a",
        "--diagnostics",
    ])
    .await;

    let (ok, out, _) = client(&url, &["demo"]).await;
    assert!(ok, "demo succeeds");
    assert!(
        out.contains(r#"result  5: {"|4th":["hi there!","hi there!","AND ME TOO"]}"#),
        "{out}"
    );
    assert_eq!(out.lines().filter(|l| l.starts_with("request ")).count(), 5);

    let (ok, out, _) = client(&url, &["call", "echos", "hello", "2", r#"{"a":1}"#]).await;
    assert!(ok);
    let value: serde_json::Value = serde_json::from_str(&out).expect("JSON result");
    assert_eq!(value, serde_json::json!(["hello", 2, {"a": 1}]));

    let (ok, out, _) = client(&url, &["call", "mpreg.whoami", "--dataset", "model-a"]).await;
    assert!(ok);
    assert_eq!(out.trim(), r#""cli-node""#);

    let (ok, _, err) = client(&url, &["call", "mpreg.whoami", "--dataset", "model-z"]).await;
    assert!(!ok, "missing dataset fails");
    assert!(err.contains("no_node_for_datasets"), "{err}");

    let (ok, _, err) = client(&url, &["call", "debug.panic"]).await;
    assert!(!ok);
    assert!(err.contains("handler_failed"), "{err}");

    let (ok, out, _) = client(&url, &["describe", "debug.sleep"]).await;
    assert!(ok);
    assert!(out.starts_with("debug.sleep(ms: u64) -> u64"), "{out}");
    assert!(out.contains("on: cli-node [model-a]"), "{out}");
    let (ok, _, err) = client(&url, &["describe", "no.such"]).await;
    assert!(!ok);
    assert!(err.contains("no function 'no.such'"), "{err}");

    // The node survived the panic.
    let (ok, out, _) = client(&url, &["call", "echo", "still here"]).await;
    assert!(ok);
    assert_eq!(out.trim(), r#""still here""#);

    terminate(child).await;
}

#[tokio::test]
async fn request_file_and_config_file() {
    let dir = std::env::temp_dir().join(format!("mpreg-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("node.toml");
    std::fs::write(&config, "name = \"from-config\"\ndatasets = [\"d1\"]\n").expect("write config");
    let (child, url) = server(&["--config", config.to_str().expect("utf-8 path")]).await;

    let request = dir.join("request.json");
    std::fs::write(
        &request,
        r#"[{"name":"a","fun":"echo","args":[1]},
            {"name":"w","fun":"mpreg.whoami","locs":["d1"]},
            {"name":"b","fun":"echos","args":["a","a"]}]"#,
    )
    .expect("write request");
    let (ok, out, _) = client(&url, &["request", request.to_str().expect("utf-8 path")]).await;
    assert!(ok);
    let value: serde_json::Value = serde_json::from_str(&out).expect("JSON results");
    assert_eq!(value, serde_json::json!({"b": [1, 1], "w": "from-config"}));

    let (ok, _, err) = client(&url, &["request", "/nonexistent/request.json"]).await;
    assert!(!ok);
    assert!(err.contains("cannot read"), "{err}");

    terminate(child).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_config_and_unreachable_node_fail_with_a_message() {
    let out = Command::new(BIN)
        .args(["server", "--config", "/nonexistent/mpreg.toml"])
        .output()
        .await
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));

    // Nothing listens on port 1 on loopback.
    let (ok, _, err) = client("ws://127.0.0.1:1", &["call", "echo", "x"]).await;
    assert!(!ok);
    assert!(err.contains("cannot connect"), "{err}");
    // Nor on port 2: with several URLs, the error names each.
    let (ok, _, err) = client("ws://127.0.0.1:1,ws://127.0.0.1:2", &["call", "echo", "x"]).await;
    assert!(!ok);
    assert!(
        err.contains("127.0.0.1:1") && err.contains("127.0.0.1:2"),
        "{err}"
    );
}

#[tokio::test]
async fn several_urls_connect_to_the_first_that_answers() {
    let (child, url) = server(&["--name", "second-seed"]).await;
    let (ok, out, err) = client(
        &format!("ws://127.0.0.1:1, {url}"),
        &["call", "mpreg.whoami"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("second-seed"), "{out}");
    terminate(child).await;
}

#[tokio::test]
async fn client_tokens_from_the_command_line_and_the_environment() {
    let dir = std::env::temp_dir().join(format!("mpreg-cli-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        "cluster_secret = \"s\"\nclient_tokens = [\"tok\"]\n",
    )
    .expect("write config");
    let (child, url) = server(&["--config", config.to_str().expect("utf-8 path")]).await;

    let (ok, _, err) = client(&url, &["call", "echo", "1"]).await;
    assert!(!ok, "no token");
    assert!(err.contains("unauthorized"), "{err}");

    let (ok, out, _) = client(&url, &["--token", "tok", "call", "echo", "2"]).await;
    assert!(ok);
    assert_eq!(out.trim(), "2");

    let out = tokio::time::timeout(
        GUARD,
        Command::new(BIN)
            .env("MPREG_TOKEN", "tok")
            .args(["client", &url, "call", "echo", "3"])
            .output(),
    )
    .await
    .expect("in time")
    .expect("run");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");

    terminate(child).await;
    let _ = std::fs::remove_dir_all(&dir);
}

const DEV_1: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/data/dev-1.config.yaml"
);

#[tokio::test]
async fn original_yaml_config_file_with_listen_flag() {
    // The file says port 7773; the flag (the helper's --listen 127.0.0.1:0)
    // wins.
    let (child, url) = server(&["--config", DEV_1]).await;
    let (ok, out, err) = client(&url, &["call", "mpreg.whoami", "--dataset", "model-b"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "\"PRIMARY SERVER\"");
    terminate(child).await;
}

#[tokio::test]
async fn environment_overrides_the_file_and_flags_override_the_environment() {
    let (child, url) = server_with_env(
        &["--config", DEV_1],
        &[("MPREG_NAME", "from-env"), ("MPREG_LISTEN", "127.0.0.1:1")],
    )
    .await;
    assert!(!url.ends_with(":1"), "the --listen flag wins: {url}");
    let (ok, out, err) = client(&url, &["call", "mpreg.whoami"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "\"from-env\"");
    terminate(child).await;

    let out = tokio::time::timeout(
        GUARD,
        Command::new(BIN)
            .env("MPREG_DIAGNOSTICS", "maybe")
            .args(["server", "--listen", "127.0.0.1:0"])
            .output(),
    )
    .await
    .expect("server exited in time")
    .expect("run mpreg server");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MPREG_DIAGNOSTICS") && err.contains("maybe"),
        "{err}"
    );
}
