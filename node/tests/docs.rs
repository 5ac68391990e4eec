//! Every command and flag the docs and the README show exists: each
//! `troop ...` and `troop-coordinator ...` line in a code block is run with
//! `--help`, and each `--flag` on it must appear in that help.

use std::path::{Path, PathBuf};
use std::process::Command;

fn coordinator_bin() -> PathBuf {
    // Built by the same `cargo nextest run --workspace` (or `cargo build`).
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join("troop-coordinator")
}

fn command_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    let mut pending = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if !in_code {
            continue;
        }
        let l = line.trim().trim_start_matches("$ ");
        if !pending.is_empty() {
            pending.push(' ');
            pending.push_str(l.trim_end_matches('\\'));
            if !l.ends_with('\\') {
                out.push(std::mem::take(&mut pending));
            }
            continue;
        }
        if l.starts_with("troop ") || l.starts_with("troop-coordinator ") {
            let body = l.split(" # ").next().unwrap_or(l);
            if body.ends_with('\\') {
                pending = body.trim_end_matches('\\').to_string();
            } else {
                out.push(body.to_string());
            }
        }
    }
    out
}

#[test]
fn every_documented_command_and_flag_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).expect("docs/") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "md") {
            files.push(p);
        }
    }
    let troop = env!("CARGO_BIN_EXE_troop");
    let coord = coordinator_bin();
    assert!(coord.exists(), "{} not built", coord.display());
    let mut checked = 0;
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read doc");
        for line in command_lines(&text) {
            let mut words = line.split_whitespace();
            let bin = match words.next() {
                Some("troop") => PathBuf::from(troop),
                Some("troop-coordinator") => coord.clone(),
                _ => continue,
            };
            let words: Vec<&str> = words.collect();
            // Subcommands: the lowercase words before the first flag.
            let subs: Vec<&str> = words
                .iter()
                .take_while(|w| {
                    !w.starts_with('-')
                        && !w.starts_with('[')
                        && w.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                })
                .copied()
                .collect();
            let out = Command::new(&bin)
                .args(&subs)
                .arg("--help")
                .output()
                .expect("run --help");
            let help = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{}: `{line}` has no such command:\n{}",
                f.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            for w in &words {
                let w = w.trim_start_matches('[');
                if let Some(flag) = w.strip_prefix("--") {
                    let flag: String = flag
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect();
                    assert!(
                        help.contains(&format!("--{flag}")),
                        "{}: `{line}` shows --{flag}, which `{} {} --help` does not know",
                        f.display(),
                        bin.display(),
                        subs.join(" ")
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} documented commands found");
}
