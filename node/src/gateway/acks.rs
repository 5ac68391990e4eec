//! Acknowledgements on their way to workers: each signed by the user when
//! an answer ends, delivered (retried) on a stream of its own, within a
//! bounded number in flight overall and per worker.

use super::*;

/// Acknowledgements in flight to one worker: a dead worker's retries
/// (up to about 30 s each) cannot take every place from healthy ones.
pub(super) const MAX_ACKS_PER_WORKER: usize = 64;

/// Acknowledgements on their way to workers at once; past it, one more is
/// dropped (and counted in `troop_acks_lost_total`) rather than queued
/// without bound.
pub(super) const MAX_ACKS_IN_FLIGHT: usize = 1024;

/// A place among the acknowledgements in flight: one of
/// `MAX_ACKS_IN_FLIGHT` in all and of `MAX_ACKS_PER_WORKER` for its worker,
/// given back when dropped.
pub(super) struct AckPlace {
    _all: tokio::sync::OwnedSemaphorePermit,
    per_worker: Arc<Mutex<HashMap<PeerId, usize>>>,
    worker: PeerId,
}

impl AckPlace {
    pub(super) fn take(state: &GatewayState, worker: PeerId) -> Option<Self> {
        let all = state.acks_in_flight.clone().try_acquire_owned().ok()?;
        let mut m = state
            .acks_per_worker
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = m.entry(worker).or_insert(0);
        if *n >= MAX_ACKS_PER_WORKER {
            return None;
        }
        *n += 1;
        Some(Self {
            _all: all,
            per_worker: state.acks_per_worker.clone(),
            worker,
        })
    }
}

impl Drop for AckPlace {
    fn drop(&mut self) {
        let mut m = self.per_worker.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.worker) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.worker);
            }
        }
    }
}

/// Delivers one acknowledgement to `worker`, retried: the connection it
/// goes out on may be the relayed one being closed in favour of a direct
/// path. Holds its place among the acks in flight until done.
pub(super) async fn deliver_ack(
    net: NetworkHandle,
    worker: PeerId,
    ack: troop_protocol::usage::Ack,
    _place: AckPlace,
) {
    use backon::Retryable;
    let send = || async {
        tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = net
                .stream_control()
                .open_stream(worker, StreamProtocol::new(INFER_PROTOCOL))
                .await
                .map_err(|e| e.to_string())?;
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
