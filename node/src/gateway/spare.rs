//! A spare stream to each warm worker, opened ahead: the next request to
//! that worker writes its frame at once instead of waiting for a stream to
//! open and its protocol to be agreed (about 0.3 ms of the 0.8 ms the mesh
//! added to the first token on loopback; a round trip or more on a real
//! network). One per worker, opened in the background after each request
//! sent there; a spare older than [`SPARE_MAX_AGE`] is dropped unused (the
//! worker gives up on a stream that sends nothing for 30 s).

use super::*;

/// A spare is used only this long after it opened.
pub(super) const SPARE_MAX_AGE: Duration = Duration::from_secs(20);

pub(super) enum Spare {
    /// Being opened (so that only one is).
    Opening,
    Ready {
        stream: libp2p::Stream,
        opened: Instant,
    },
}

impl GatewayState {
    /// The ready, fresh spare stream to `worker`, if any.
    pub(super) fn take_spare(&self, worker: &PeerId) -> Option<libp2p::Stream> {
        let mut spares = self.spares.locked()?;
        match spares.remove(worker)? {
            Spare::Ready { stream, opened } if opened.elapsed() < SPARE_MAX_AGE => Some(stream),
            Spare::Ready { .. } => None,
            Spare::Opening => {
                spares.insert(*worker, Spare::Opening);
                None
            }
        }
    }

    /// Opens the next spare to `worker` in the background, unless one is
    /// ready or being opened, or the worker is not among the warm ones.
    pub(super) fn open_spare(self: &Arc<Self>, worker: PeerId) {
        {
            let Some(warm) = self.warm.locked() else {
                return;
            };
            if !warm.contains(&worker) {
                return;
            }
            let Some(mut spares) = self.spares.locked() else {
                return;
            };
            match spares.get(&worker) {
                Some(Spare::Opening) => return,
                Some(Spare::Ready { opened, .. }) if opened.elapsed() < SPARE_MAX_AGE => return,
                _ => {}
            }
            // Workers that went cold keep no spare.
            spares.retain(|p, _| warm.contains(p));
            spares.insert(worker, Spare::Opening);
        }
        let state = self.clone();
        tokio::spawn(async move {
            let opened = tokio::time::timeout(
                DISCOVERY_TIMEOUT,
                state
                    .net
                    .open_stream(worker, StreamProtocol::new(INFER_PROTOCOL)),
            )
            .await;
            let Some(mut spares) = state.spares.locked() else {
                return;
            };
            match opened {
                Ok(Ok(stream)) => {
                    spares.insert(
                        worker,
                        Spare::Ready {
                            stream,
                            opened: Instant::now(),
                        },
                    );
                }
                _ => {
                    spares.remove(&worker);
                }
            }
        });
    }
}
