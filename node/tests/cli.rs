//! A newcomer's mistakes on the command line get an answer that says what
//! was expected and what to do, at once and before anything starts.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `troop args`; one still running after 20 s (a node that started
/// instead of refusing) is killed and the test fails.
fn troop(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_troop"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("troop runs");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().expect("output");
            panic!(
                "troop {args:?} was still running after 20 s instead of refusing: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn keygen(dir: &std::path::Path) -> String {
    let key = dir.join("me.key").display().to_string();
    assert!(troop(&["keygen", "--out", &key]).status.success());
    key
}

/// A coordinator or upstream given without a scheme fails at start, saying
/// how to write it (was: "coordinator unreachable: builder error" after
/// 7 s of retries).
#[test]
fn a_url_without_a_scheme_is_refused_with_the_url_to_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = keygen(dir.path());
    for args in [
        vec![
            "gateway",
            "--identity",
            &key,
            "--coordinator",
            "127.0.0.1:7070",
            "--http",
            "127.0.0.1:0",
        ],
        vec![
            "worker",
            "--identity",
            &key,
            "--coordinator",
            "http://127.0.0.1:7070",
            "--upstream",
            "127.0.0.1:8081",
            "--http",
            "127.0.0.1:0",
        ],
    ] {
        let started = Instant::now();
        let o = troop(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains("is not an http:// or https:// URL"), "{err}");
        assert!(err.contains("write http://127.0.0.1:"), "{err}");
        eprintln!("refused in {:?}: {}", started.elapsed(), err.trim());
    }
}

/// An identity file that exists but is not a troop key (a PEM, say) is
/// not answered with "make one with troop keygen --out <that file>",
/// which keygen would refuse: it says to keep it and use another path.
#[test]
fn a_pem_file_as_identity_gets_advice_that_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = dir.path().join("worker.pem");
    std::fs::write(
        &pem,
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let pem = pem.display().to_string();
    let o = troop(&[
        "gateway",
        "--identity",
        &pem,
        "--coordinator",
        "http://127.0.0.1:7070",
        "--http",
        "127.0.0.1:0",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("a PEM file"), "{err}");
    assert!(!err.contains(&format!("--out {pem}")), "{err}");
    // The advice given works: keygen makes a key at another path.
    let other = dir.path().join("node.key").display().to_string();
    assert!(troop(&["keygen", "--out", &other]).status.success());
    let o = troop(&["keygen", "--out", &pem]);
    assert!(!o.status.success(), "keygen never overwrites a file");
}
