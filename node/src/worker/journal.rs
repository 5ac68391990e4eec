//! The worker's session journal: every open session's ticket, served
//! request lines and acknowledgements, on disk, so that a worker killed
//! mid-session (a crash, a power cut, `kill -9`) files the receipts it owes
//! when it starts again instead of forgetting what it served.
//!
//! One file per session, `<state>/sessions/<jti>.jsonl`, one JSON entry per
//! line (`open`, `line`, `ack`, `closed`; see the protocol spec's "Session
//! journal"). A single writer thread appends them in batches: it takes
//! every entry waiting (at most [`BATCH`]), writes each touched file,
//! `fsync`s it once, and only then marks the batch durable. The crash rule:
//! a request of a session is not served until every earlier entry of that
//! session is durable ([`Journal::durable`]); an entry written within the
//! last batch before a crash may be lost (an ack: the line counts as
//! unacknowledged; a line: that request is not billed).
//!
//! After a restart ([`restore`]), a session without `closed` is opened
//! again with its lines and acks and closes by the usual rules (its
//! gateway may go on using it); a `closed` one has filed its receipt
//! already and only keeps its ticket refused until it expires. Files of
//! closed sessions are deleted once their ticket has expired.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use troop_protocol::ticket::TicketClaims;
use troop_protocol::usage::{Ack, RequestLine};

use super::session::Session;

/// Most entries written (and `fsync`ed) in one batch.
pub const BATCH: usize = 1024;
/// Entries waiting for the writer before appending blocks the caller.
pub const QUEUE: usize = 65_536;
/// A closed session's file is kept this long after its ticket expired
/// (beyond the ticket verifier's leeway), then deleted.
pub const KEEP_AFTER_EXPIRY_SECS: u64 = 120;
/// How often the writer looks for closed sessions to delete.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// One line of a session's journal file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "e", rename_all = "snake_case")]
pub enum Entry {
    /// The session opened: its ticket (text and claims) and reservation.
    Open {
        ticket: String,
        claims: TicketClaims,
        limit_ms: u64,
        at_ms: u64,
    },
    /// A request ended: its line, and the commitment of the evidence its
    /// answer carried.
    Line {
        line: RequestLine,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        commitment: Option<String>,
    },
    /// The user's acknowledgement of a request (checked when it came).
    Ack { ack: Ack },
    /// The session closed and its receipt (if it served anything) was
    /// written to the receipt queue.
    Closed { at_ms: u64 },
}

enum Op {
    Append {
        seq: u64,
        jti: String,
        /// Ticket expiry (unix s), for `closed` entries: when to delete.
        closed_exp: Option<u64>,
        bytes: Vec<u8>,
    },
}

/// The journal's writing end; cheap to share behind the worker's state.
pub struct Journal {
    dir: PathBuf,
    tx: mpsc::SyncSender<Op>,
    /// Sequence of the last entry handed to the writer.
    seq: AtomicU64,
    /// Sequence of the last entry on disk.
    durable: tokio::sync::watch::Receiver<u64>,
}

/// File name of a session's journal (the jti, reduced to safe characters,
/// as the receipt queue names receipts).
pub fn file_name(jti: &str) -> String {
    format!("{}.jsonl", crate::receipts::safe_name(jti))
}

impl Journal {
    /// Opens the journal in `dir` and starts its writer thread;
    /// `closed` lists the closed sessions found by [`restore`] (jti, ticket
    /// expiry), deleted once expired.
    pub fn open(dir: &Path, closed: Vec<(String, u64)>) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let (durable_tx, durable) = tokio::sync::watch::channel(0);
        let d = dir.to_path_buf();
        std::thread::Builder::new()
            .name("troop-journal".into())
            .spawn(move || writer(d, rx, durable_tx, closed.into_iter().collect()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tx,
            seq: AtomicU64::new(0),
            durable,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Hands `entry` of session `jti` to the writer; returns its sequence
    /// number (see [`durable`](Self::durable)). Call it under the session
    /// book's lock, so entries reach the writer in the book's order.
    pub fn append(&self, jti: &str, entry: &Entry, exp: u64) -> u64 {
        let bytes = match serde_json::to_vec(entry) {
            Ok(mut b) => {
                b.push(b'\n');
                b
            }
            Err(e) => {
                tracing::error!(error = %e, "a journal entry could not be encoded");
                return self.seq.load(Ordering::SeqCst);
            }
        };
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let op = Op::Append {
            seq,
            jti: jti.to_string(),
            closed_exp: matches!(entry, Entry::Closed { .. }).then_some(exp),
            bytes,
        };
        match self.tx.try_send(op) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(op)) => {
                metrics::counter!("troop_journal_full_total").increment(1);
                tracing::warn!(
                    "the session journal is {QUEUE} entries behind the disk; waiting for it"
                );
                let _ = self.tx.send(op);
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {
                tracing::error!("the session journal's writer is gone; an entry is lost");
            }
        }
        seq
    }

    /// Waits until entry `seq` (and every one before it) is on disk.
    pub async fn durable(&self, seq: u64) {
        if *self.durable.borrow() >= seq {
            return;
        }
        let mut rx = self.durable.clone();
        // An error means the writer is gone: nothing more will be written.
        let _ = rx.wait_for(|d| *d >= seq).await;
    }

    /// Sequence of the last entry on disk.
    pub fn durable_seq(&self) -> u64 {
        *self.durable.borrow()
    }
}

fn writer(
    dir: PathBuf,
    rx: mpsc::Receiver<Op>,
    durable: tokio::sync::watch::Sender<u64>,
    mut closed: HashMap<String, u64>,
) {
    let mut last_sweep = std::time::Instant::now();
    sweep(&dir, &mut closed);
    loop {
        let first = match rx.recv_timeout(SWEEP_EVERY) {
            Ok(op) => Some(op),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if last_sweep.elapsed() >= SWEEP_EVERY {
            sweep(&dir, &mut closed);
            last_sweep = std::time::Instant::now();
        }
        let Some(first) = first else { continue };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let mut last = 0;
        for Op::Append {
            seq,
            jti,
            closed_exp,
            bytes,
        } in batch
        {
            last = last.max(seq);
            if let Some(exp) = closed_exp {
                closed.insert(jti.clone(), exp);
            }
            match files.iter_mut().find(|(j, _)| *j == jti) {
                Some((_, b)) => b.extend_from_slice(&bytes),
                None => files.push((jti, bytes)),
            }
        }
        let mut created = false;
        for (jti, bytes) in &files {
            let path = dir.join(file_name(jti));
            created |= !path.exists();
            if let Err(e) = append_synced(&path, bytes) {
                metrics::counter!("troop_journal_errors_total").increment(1);
                tracing::error!(error = %e, file = %path.display(), "could not write the session journal");
            }
        }
        if created && let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        metrics::counter!("troop_journal_batches_total").increment(1);
        let _ = durable.send(last);
    }
}

fn append_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_data()
}

/// Deletes the files of closed sessions whose ticket expired more than
/// [`KEEP_AFTER_EXPIRY_SECS`] ago.
fn sweep(dir: &Path, closed: &mut HashMap<String, u64>) {
    let now = troop_protocol::policy::unix_secs();
    closed.retain(|jti, exp| {
        if now < exp.saturating_add(KEEP_AFTER_EXPIRY_SECS) {
            return true;
        }
        let _ = std::fs::remove_file(dir.join(file_name(jti)));
        false
    });
}

/// What a restart finds in the journal.
#[derive(Debug, Default)]
pub struct Restored {
    /// Sessions that were open: to be opened again.
    pub open: Vec<Session>,
    /// Sessions closed already (jti, ticket expiry): their tickets stay
    /// refused until they expire.
    pub closed: Vec<(String, u64)>,
    /// Lines that could not be read (a torn last write): skipped.
    pub skipped_lines: usize,
}

/// Reads every session journal in `dir`. A session whose receipt is
/// waiting in the receipt queue (`filed` says so by jti) counts as closed.
pub fn restore(dir: &Path, filed: impl Fn(&str) -> bool) -> Restored {
    let mut out = Restored::default();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut paths: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    paths.sort();
    for path in paths {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let mut entries = Vec::new();
        for l in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Entry>(l) {
                Ok(e) => entries.push(e),
                Err(_) => out.skipped_lines += 1,
            }
        }
        match session_of(entries) {
            Some((sess, false)) if !filed(&sess.claims.jti) => out.open.push(sess),
            Some((sess, _)) => out.closed.push((sess.claims.jti, sess.claims.exp)),
            None => {
                // No `open` entry survived: nothing to bill or refuse.
                tracing::warn!(file = %path.display(), "a session journal without its opening; removed");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    out
}

/// The session a journal describes, and whether it closed; `None` without
/// an `open` entry. The entries may come in any order: the first line per
/// index and the first ack per index win.
pub fn session_of(entries: Vec<Entry>) -> Option<(Session, bool)> {
    let mut opened = None;
    let mut lines: Vec<RequestLine> = Vec::new();
    let mut acks: HashMap<u32, Ack> = HashMap::new();
    let mut commitments = HashMap::new();
    let mut closed = false;
    let mut seen = HashSet::new();
    for e in entries {
        match e {
            Entry::Open {
                ticket,
                claims,
                limit_ms,
                at_ms,
            } => {
                opened.get_or_insert((ticket, claims, limit_ms, at_ms));
            }
            Entry::Line { line, commitment } => {
                if seen.insert(line.index) {
                    if let Some(c) = commitment {
                        commitments.insert(line.index, c);
                    }
                    lines.push(line);
                }
            }
            Entry::Ack { ack } => {
                acks.entry(ack.index).or_insert(ack);
            }
            Entry::Closed { .. } => closed = true,
        }
    }
    let (ticket, claims, limit_ms, at_ms) = opened?;
    acks.retain(|i, _| seen.contains(i));
    let used_ms = lines
        .iter()
        .map(|l| l.finished_at.saturating_sub(l.started_at))
        .sum();
    let last = lines
        .iter()
        .map(|l| l.finished_at)
        .max()
        .unwrap_or(0)
        .max(at_ms);
    Some((
        Session {
            claims,
            ticket,
            limit_ms,
            used_ms,
            active: 0,
            indices: seen,
            lines,
            acks,
            commitments,
            last_activity_ms: last,
            journaled: 0,
        },
        closed,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use troop_protocol::usage::LineStatus;

    fn claims(jti: &str) -> TicketClaims {
        TicketClaims {
            iss: "troop-coordinator".into(),
            sub: "12D3KooUser".into(),
            aud: "12D3KooWorker".into(),
            model: "m".into(),
            jti: jti.into(),
            iat: 0,
            nbf: 0,
            exp: u64::MAX / 4,
            max_tokens: None,
            reserved_milli: 300_000,
        }
    }

    fn line(index: u32) -> RequestLine {
        RequestLine {
            index,
            started_at: 1_000,
            finished_at: 1_500,
            prompt_tokens: 3,
            completion_tokens: 5,
            chunks: 5,
            status: LineStatus::Completed,
            ack: None,
        }
    }

    fn open(jti: &str) -> Entry {
        Entry::Open {
            ticket: format!("ticket-{jti}"),
            claims: claims(jti),
            limit_ms: 300_000,
            at_ms: 900,
        }
    }

    #[tokio::test]
    async fn entries_written_are_durable_and_read_back_as_the_open_session() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(dir.path(), Vec::new()).expect("journal");
        j.append("a", &open("a"), 0);
        for i in 0..3 {
            j.append(
                "a",
                &Entry::Line {
                    line: line(i),
                    commitment: Some(format!("sha256:{i}")),
                },
                0,
            );
        }
        let last = j.append("b", &open("b"), 0);
        j.append("b", &Entry::Closed { at_ms: 2_000 }, 7);
        j.durable(last).await;
        assert!(j.durable_seq() >= last);
        // What the writer has made durable is what a restart reads.
        let r = restore(dir.path(), |_| false);
        let durable_b_closed = r.closed.iter().any(|(jti, _)| jti == "b");
        let a = r.open.iter().find(|s| s.claims.jti == "a").expect("a open");
        assert_eq!(a.lines.len(), 3);
        assert_eq!(a.used_ms, 1_500);
        assert_eq!(a.ticket, "ticket-a");
        assert_eq!(a.commitments.get(&2).map(String::as_str), Some("sha256:2"));
        assert_eq!(a.last_activity_ms, 1_500);
        // `b`'s `closed` may or may not be on disk yet: b is either way.
        assert!(durable_b_closed || r.open.iter().any(|s| s.claims.jti == "b"));
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_a_filed_receipt_counts_as_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut text = String::new();
        for e in [
            open("a"),
            Entry::Line {
                line: line(0),
                commitment: None,
            },
        ] {
            text.push_str(&serde_json::to_string(&e).expect("json"));
            text.push('\n');
        }
        // A crash in the middle of a write.
        text.push_str(r#"{"e":"line","line":{"index":1,"star"#);
        std::fs::write(dir.path().join(file_name("a")), &text).expect("write");
        std::fs::write(
            dir.path().join(file_name("b")),
            format!("{}\n", serde_json::to_string(&open("b")).expect("json")),
        )
        .expect("write");
        let r = restore(dir.path(), |jti| jti == "b");
        assert_eq!(r.skipped_lines, 1);
        assert_eq!(r.open.len(), 1);
        assert_eq!(r.open[0].lines.len(), 1);
        assert_eq!(r.closed, vec![("b".to_string(), u64::MAX / 4)]);
    }

    #[test]
    fn lines_and_acks_in_any_order_give_one_line_per_index_with_its_first_ack() {
        let user = troop_protocol::identity::generate();
        let ack = |i: u32, observed: u64| Ack::sign(&user, "a", "w", i, 5, 5, observed);
        let entries = vec![
            Entry::Ack { ack: ack(0, 400) },
            open("a"),
            Entry::Line {
                line: line(0),
                commitment: None,
            },
            Entry::Line {
                line: RequestLine {
                    completion_tokens: 99,
                    ..line(0)
                },
                commitment: None,
            },
            Entry::Ack { ack: ack(0, 999) },
            // An ack for an index no line has: dropped.
            Entry::Ack { ack: ack(5, 1) },
        ];
        let (s, closed) = session_of(entries).expect("a session");
        assert!(!closed);
        assert_eq!(s.lines.len(), 1);
        assert_eq!(s.lines[0].completion_tokens, 5);
        assert_eq!(s.acks.len(), 1);
        assert_eq!(s.acks[&0].observed_ms, 400);
        assert!(session_of(vec![Entry::Closed { at_ms: 1 }]).is_none());
    }
}
