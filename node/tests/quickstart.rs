//! The README's quick start "On one machine" run as written, top to bottom,
//! so it cannot drift: the block between `<!-- quickstart:begin -->` and
//! `<!-- quickstart:end -->` runs in bash (`set -e`) in a scratch copy of
//! the checkout's scripts, with `troop` and `troop-coordinator` on PATH.
//! After each line that starts a process in the background, the harness
//! waits (with a deadline) until that process is ready, as a person typing
//! the lines would; every other line must succeed. Its ports are the
//! README's (4001, 7070, 8080, 8081, 9464): the test says "skipped" when
//! one is taken (CI, with `TROOP_REQUIRE_QUICKSTART_TEST=1`, fails then).

use std::path::{Path, PathBuf};
use std::process::Command;

fn block(readme: &str) -> Vec<String> {
    let start = readme
        .find("<!-- quickstart:begin -->")
        .expect("the README marks its quick start");
    let end = readme
        .find("<!-- quickstart:end -->")
        .expect("the README marks its quick start's end");
    let body = &readme[start..end];
    let mut lines = Vec::new();
    let mut pending = String::new();
    for l in body.lines() {
        let t = l.trim_end();
        if t.starts_with("```") || t.starts_with("<!--") || t.is_empty() {
            continue;
        }
        if let Some(cont) = t.strip_suffix('\\') {
            pending.push_str(cont);
            continue;
        }
        pending.push_str(t);
        lines.push(std::mem::take(&mut pending));
    }
    lines
}

/// What to wait for after a background line, as a bash command that
/// succeeds once it is ready.
fn readiness(line: &str) -> Option<&'static str> {
    if !line.trim_end().ends_with('&') {
        return None;
    }
    Some(if line.contains("troop relay") {
        "ready 'relay on 4001' python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 4001), 1)'"
    } else if line.contains("troop-coordinator serve") {
        "ready 'coordinator' curl -fsS http://127.0.0.1:7070/health"
    } else if line.contains("model_server.py") {
        "ready 'model server' curl -fsS http://127.0.0.1:8081/health"
    } else if line.contains("troop worker") {
        "ready 'worker in /bootstrap' sh -c 'curl -fsS http://127.0.0.1:7070/bootstrap | grep -q \"\\\"relay\\\":false\"'"
    } else if line.contains("troop gateway") {
        "ready 'gateway lists the model' sh -c 'curl -fsS http://127.0.0.1:8080/v1/models | grep -q smollm2-135m'"
    } else {
        panic!("the harness does not know when this is ready: {line}")
    })
}

fn free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn the_readme_quick_start_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let required = std::env::var("TROOP_REQUIRE_QUICKSTART_TEST").as_deref() == Ok("1");
    let skip = |why: &str| {
        assert!(!required, "TROOP_REQUIRE_QUICKSTART_TEST=1 but {why}");
        eprintln!("skipped: the README quick start ({why})");
    };
    let taken: Vec<u16> = [4001, 7070, 8080, 8081, 9464]
        .into_iter()
        .filter(|p| !free(*p))
        .collect();
    if !taken.is_empty() {
        return skip(&format!("ports {taken:?} are taken"));
    }
    if Command::new("curl").arg("--version").output().is_err() {
        return skip("curl is not installed");
    }
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let lines = block(&readme);
    assert!(lines.len() >= 10, "{lines:?}");
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_troop"));
    let bin = exe.parent().expect("bin dir").to_path_buf();
    assert!(
        bin.join("troop-coordinator").exists(),
        "troop-coordinator not built next to troop"
    );
    // A scratch folder with the checkout's scripts (the model server's venv
    // is the checkout's own, found through scripts/setup-model).
    let dir = tempfile::tempdir().expect("tempdir");
    let mut script = String::from(
        r#"set -euo pipefail
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null' EXIT
ready() {
    what=$1; shift
    for _ in $(seq 1 900); do
        if "$@" >/dev/null 2>&1; then echo "== ready: $what" >&2; return 0; fi
        sleep 0.2
    done
    echo "== not ready after 180 s: $what" >&2
    return 1
}
"#,
    );
    for l in &lines {
        script.push_str(&format!("echo '== {}' >&2\n", l.replace('\'', "'\\''")));
        // Background processes write to their own logs.
        if l.trim_end().ends_with('&') {
            let n = script.matches("&\n").count();
            let cmd = l.trim_end().trim_end_matches('&');
            script.push_str(&format!("{cmd} > bg{n}.log 2>&1 &\n"));
        } else {
            script.push_str(l);
            script.push('\n');
        }
        if let Some(wait) = readiness(l) {
            script.push_str(wait);
            script.push('\n');
        }
    }
    std::fs::write(dir.path().join("quickstart.sh"), &script).expect("script");
    let scripts = dir.path().join("scripts");
    std::fs::create_dir_all(&scripts).expect("scripts dir");
    // setup-model and the model server run from the checkout (its .venv).
    std::os::unix::fs::symlink(
        root.join("scripts/setup-model"),
        scripts.join("setup-model"),
    )
    .expect("link setup-model");
    std::os::unix::fs::symlink(
        root.join("scripts/model_server.py"),
        scripts.join("model_server.py"),
    )
    .expect("link model_server.py");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg("quickstart.sh")
        .current_dir(dir.path())
        .env("PATH", path)
        .env("RUST_LOG", "warn")
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logs: String = std::fs::read_dir(dir.path())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("bg"))
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            format!(
                "--- {}\n{}\n",
                e.file_name().to_string_lossy(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect();
    assert!(
        out.status.success(),
        "the quick start failed:\n{stderr}\n{stdout}\n{logs}"
    );
    // The answer came back, the account shows what it cost, the doctor saw
    // the worker on this machine.
    assert!(stdout.contains("\"choices\""), "{stdout}");
    assert!(stdout.contains("smollm2-135m"), "{stdout}");
    assert!(stdout.contains("account 12D3KooW"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("node on this machine") && l.contains("worker")),
        "{stdout}"
    );
}
