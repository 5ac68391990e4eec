//! The worker's receipt queue: every receipt is written to disk before it
//! is sent, sent with retries and backoff, and removed only once the
//! coordinator has taken it (or refused it for good). While the
//! coordinator is away, receipts wait on disk; after a restart they are
//! sent. The coordinator settles each job id once, so a receipt sent twice
//! is still counted once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use troop_protocol::sync::RwLockExt as _;

use tokio::sync::Notify;
use troop_protocol::receipt::Receipt;

use crate::coordinator_client::{ClientError, CoordinatorClient};

/// A job id reduced to characters safe in a file name.
pub fn safe_name(jti: &str) -> String {
    jti.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect()
}

#[derive(Clone)]
pub struct ReceiptQueue {
    dir: PathBuf,
    notify: Arc<Notify>,
    /// Receipts the coordinator took (settled or refunded) since start.
    delivered: Arc<AtomicU64>,
    /// Receipts refused for good (kept under `rejected/`) since start.
    rejected: Arc<AtomicU64>,
    /// Receipts on disk waiting, as last counted (the status page reads
    /// this instead of the folder).
    waiting: Arc<AtomicU64>,
}

impl ReceiptQueue {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir.join("rejected"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            notify: Arc::new(Notify::new()),
            delivered: Arc::default(),
            rejected: Arc::default(),
            waiting: Arc::default(),
        })
    }

    /// Whether the receipt of job `jti` waits in the queue.
    pub fn has(&self, jti: &str) -> bool {
        self.dir.join(format!("{}.json", safe_name(jti))).exists()
    }

    /// Writes the receipt durably (write to a temp file, fsync, rename).
    /// It blocks on the disk: call it from a blocking thread
    /// ([`enqueue_async`](Self::enqueue_async) does).
    pub fn enqueue(&self, r: &Receipt) -> std::io::Result<()> {
        let safe = safe_name(&r.job_id);
        let body = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        let tmp = self.dir.join(format!(".{safe}.tmp"));
        std::fs::write(&tmp, &body)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(format!("{safe}.json")))?;
        metrics::counter!("troop_receipts_queued_total").increment(1);
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.notify.notify_one();
        Ok(())
    }

    /// [`enqueue`](Self::enqueue) on the runtime's blocking threads (the
    /// fsync may take tens of milliseconds on a busy disk).
    pub async fn enqueue_async(&self, r: Receipt) -> std::io::Result<()> {
        let q = self.clone();
        tokio::task::spawn_blocking(move || q.enqueue(&r))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Receipts waiting on disk, as last counted (no disk access).
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Receipts delivered since start.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Receipts refused for good since start.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Receipts waiting to be delivered.
    pub fn pending(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// [`pending`](Self::pending) read on a blocking thread; updates the
    /// count of receipts waiting.
    async fn pending_async(&self) -> Vec<PathBuf> {
        let q = self.clone();
        let v = tokio::task::spawn_blocking(move || q.pending())
            .await
            .unwrap_or_default();
        self.waiting.store(v.len() as u64, Ordering::Relaxed);
        metrics::gauge!("troop_receipts_waiting").set(v.len() as f64);
        v
    }

    /// Delivers queued receipts forever: at once when one is added, and
    /// again with backoff (1 s doubling to 60 s, backon's exponential
    /// policy) while the coordinator is unreachable.
    pub async fn run(self, client: CoordinatorClient, key: Arc<RwLock<Vec<u8>>>) {
        use backon::BackoffBuilder as _;
        let policy = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_secs(1))
            .with_max_delay(Duration::from_secs(60))
            .without_max_times();
        let mut delays = policy.build();
        loop {
            let mut failed = false;
            let pending = self.pending_async().await;
            for path in pending {
                let Ok(body) = tokio::fs::read(&path).await else {
                    continue;
                };
                let k = key.reading().map(|k| k.clone()).unwrap_or_default();
                match client.submit_receipt(&k, body).await {
                    Ok(s) => {
                        tracing::info!(job = %s.job_id, outcome = %s.outcome, cost = s.cost, replayed = s.replayed, "receipt settled");
                        let _ = tokio::fs::remove_file(&path).await;
                        self.delivered.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("troop_receipts_delivered_total").increment(1);
                    }
                    Err(ClientError::Refused {
                        status, message, ..
                    }) if matches!(status, 400 | 404 | 409 | 413 | 422) => {
                        tracing::warn!(status, %message, file = %path.display(), "receipt refused for good; kept under rejected/");
                        self.rejected.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("troop_receipts_rejected_total").increment(1);
                        if let Some(name) = path.file_name() {
                            let _ = tokio::fs::rename(&path, self.dir.join("rejected").join(name))
                                .await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "receipt not delivered yet; will retry");
                        failed = true;
                        break;
                    }
                }
            }
            self.pending_async().await;
            if failed {
                let delay = delays.next().unwrap_or(Duration::from_secs(60));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.notify.notified() => {}
                }
            } else {
                delays = policy.build();
                self.notify.notified().await;
            }
        }
    }
}
