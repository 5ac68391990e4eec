//! Acknowledgements on their way to workers: each signed by the user when
//! an answer ends, queued to one sender task behind a bounded channel and
//! delivered (retried) on a stream of its own, within a bounded number in
//! flight overall and per worker.

use super::*;

/// Acknowledgements in flight to one worker: a dead worker's retries
/// (up to about 30 s each) cannot take every place from healthy ones.
pub(super) const MAX_ACKS_PER_WORKER: usize = 64;

/// Acknowledgements on their way to workers at once; past it, one more is
/// dropped (and counted in `troop_acks_lost_total`) rather than queued
/// without bound.
pub(super) const MAX_ACKS_IN_FLIGHT: usize = 1024;

/// How many acknowledgements run per worker: a pure count the sender task
/// owns (no lock), so its limits are unit-tested.
#[derive(Default)]
pub(super) struct PerWorker {
    running: HashMap<PeerId, usize>,
}

impl PerWorker {
    /// Takes a place for one more delivery to `worker`; false when it
    /// already has [`MAX_ACKS_PER_WORKER`].
    pub(super) fn admit(&mut self, worker: PeerId) -> bool {
        let n = self.running.entry(worker).or_insert(0);
        if *n >= MAX_ACKS_PER_WORKER {
            return false;
        }
        *n += 1;
        true
    }

    /// A delivery to `worker` ended (sent or given up).
    pub(super) fn done(&mut self, worker: PeerId) {
        if let Some(n) = self.running.get_mut(&worker) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.running.remove(&worker);
            }
        }
    }
}

/// The handle answers go through: acknowledgements are queued on a
/// bounded channel to one sender task, which delivers up to
/// [`MAX_ACKS_IN_FLIGHT`] at once (at most [`MAX_ACKS_PER_WORKER`] per
/// worker). A full queue or a worker at its limit drops the acknowledgement
/// (counted in `troop_acks_lost_total`) instead of queueing without bound.
pub(super) struct AckSender {
    tx: mpsc::Sender<(PeerId, troop_protocol::usage::Ack)>,
}

impl AckSender {
    /// Starts the sender task; it ends once every `AckSender` is dropped
    /// and what was queued is delivered or given up.
    pub(super) fn start(net: NetworkHandle) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(MAX_ACKS_IN_FLIGHT);
        (Self { tx }, tokio::spawn(send_acks(net, rx)))
    }

    /// Queues one acknowledgement for `worker` (never waits).
    pub(super) fn send(&self, worker: PeerId, ack: troop_protocol::usage::Ack) {
        if self.tx.try_send((worker, ack)).is_err() {
            metrics::counter!("troop_acks_lost_total").increment(1);
            tracing::warn!(%worker, "too many acknowledgements in flight; one dropped");
        }
    }
}

/// The sender task: owns the deliveries running and their count per worker.
async fn send_acks(
    net: NetworkHandle,
    mut rx: mpsc::Receiver<(PeerId, troop_protocol::usage::Ack)>,
) {
    use futures::StreamExt as _;
    let mut running = futures::stream::FuturesUnordered::new();
    let mut per_worker = PerWorker::default();
    let mut open = true;
    while open || !running.is_empty() {
        tokio::select! {
            Some(worker) = running.next(), if !running.is_empty() => per_worker.done(worker),
            msg = rx.recv(), if open && running.len() < MAX_ACKS_IN_FLIGHT => match msg {
                Some((worker, ack)) if per_worker.admit(worker) => {
                    let net = net.clone();
                    running.push(async move {
                        deliver_ack(net, worker, ack).await;
                        worker
                    });
                }
                Some((worker, _)) => {
                    metrics::counter!("troop_acks_lost_total").increment(1);
                    tracing::warn!(%worker, "too many acknowledgements in flight to this worker; one dropped");
                }
                None => open = false,
            },
        }
    }
}

/// Delivers one acknowledgement to `worker`, retried: the connection it
/// goes out on may be the relayed one being closed in favour of a direct
/// path.
async fn deliver_ack(net: NetworkHandle, worker: PeerId, ack: troop_protocol::usage::Ack) {
    use backon::Retryable;
    let send = || async {
        tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = net
                .open_stream(worker, StreamProtocol::new(INFER_PROTOCOL))
                .await?;
            write_frame(&mut s, &Frame::Ack { ack: ack.clone() })
                .await
                .map_err(|e| e.to_string())?;
            futures::AsyncWriteExt::close(&mut s)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        })
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
    };
    let sent = send
        .retry(
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_times(4),
        )
        .sleep(tokio::time::sleep)
        .notify(|e: &String, _| {
            tracing::debug!(%worker, error = %e, "acknowledgement not delivered; retrying")
        })
        .await;
    match sent {
        Ok(()) => metrics::counter!("troop_acks_sent_total").increment(1),
        Err(e) => {
            metrics::counter!("troop_acks_lost_total").increment(1);
            tracing::info!(%worker, error = %e, "acknowledgement not delivered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_cannot_take_every_place() {
        let mut p = PerWorker::default();
        let (dead, healthy) = (PeerId::random(), PeerId::random());
        for _ in 0..MAX_ACKS_PER_WORKER {
            assert!(p.admit(dead));
        }
        assert!(!p.admit(dead), "the dead worker is at its limit");
        assert!(p.admit(healthy), "others still get places");
        p.done(dead);
        assert!(p.admit(dead), "a place freed is taken again");
        for _ in 0..MAX_ACKS_PER_WORKER {
            p.done(dead);
        }
        p.done(healthy);
        assert!(p.running.is_empty(), "nothing is kept for idle workers");
    }
}
