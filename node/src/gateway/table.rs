//! The gateway's live table of workers, fed by gossip adverts, ping round
//! trips and DHT lookups, and the rule that picks a worker.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use serde::Serialize;
use troop_protocol::advert::{Advert, digest_matches};

/// Where we know a worker from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Gossip,
    Dht,
    /// The coordinator's `GET /bootstrap?model=`.
    Coordinator,
}

/// The digest an unpinned request goes to, from the advertised digests
/// of a model's workers best first (`None` inside: a worker without one;
/// `None` outside: no advert yet): the one most workers advertise, the
/// first seen (so the best-scored) among equals.
fn chosen_digest<'a>(digests: impl Iterator<Item = Option<Option<&'a str>>>) -> Option<String> {
    let mut counts: Vec<(Option<&str>, usize)> = Vec::new();
    for d in digests.flatten() {
        match counts.iter_mut().find(|(k, _)| *k == d) {
            Some((_, n)) => *n += 1,
            None => counts.push((d, 1)),
        }
    }
    let most = counts.iter().map(|(_, n)| *n).max().unwrap_or(0);
    counts
        .into_iter()
        .find(|(_, n)| *n == most)
        .and_then(|(d, _)| d.map(String::from))
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub peer: PeerId,
    pub advert: Option<Advert>,
    pub models: Vec<String>,
    pub source: Source,
    pub seen: Instant,
    pub ttl: Duration,
    pub rtt: Option<Duration>,
    /// Jobs this gateway has running on it right now (adverts lag behind).
    pub local_inflight: u32,
}

/// One row of `troop models` and `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerRow {
    pub model: String,
    pub peer_id: String,
    pub source: Source,
    /// From the worker's advert; `None` when known only from a lookup.
    pub queue_depth: Option<u32>,
    pub active_jobs: Option<u32>,
    pub max_jobs: Option<u32>,
    pub ttft_ms: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub rtt_ms: Option<f64>,
    pub hardware_multiplier: Option<f64>,
    pub context_length: Option<u32>,
    /// The weights' digest the worker advertises (`sha256:<hex>`).
    pub digest: Option<String>,
    /// The runtime and version the worker advertises.
    pub runtime: Option<String>,
    pub score: f64,
}

/// One model of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSummary {
    pub id: String,
    pub workers: usize,
    /// The weights its workers advertise, most workers first.
    pub digests: Vec<DigestCount>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DigestCount {
    pub digest: String,
    pub workers: usize,
}

#[derive(Default)]
pub struct WorkerTable {
    entries: HashMap<PeerId, Entry>,
    rtts: HashMap<PeerId, Duration>,
    /// Workers a dial failed to reach, and when: left out until an advert
    /// sent after that moment says they are back (DHT records of a dead
    /// worker outlive it by up to an hour).
    unreachable: HashMap<PeerId, Instant>,
}

/// Most workers the table holds; beyond it, expired rows are dropped and
/// then new adverts are ignored (counted in `troop_limit_hits_total`).
pub const MAX_ENTRIES: usize = 20_000;

/// Round trips kept for peers that are not (yet) in the table.
pub const MAX_RTTS: usize = 4_096;

/// Default guesses before anything was measured.
const DEFAULT_TTFT_MS: f64 = 150.0;
const DEFAULT_RTT_MS: f64 = 5.0;
const DHT_TTL: Duration = Duration::from_secs(60);

impl Entry {
    /// The digest this worker advertises for `model`: `None` when it sent
    /// no advert yet (found by a lookup), `Some(None)` when its advert
    /// names no digest.
    pub fn digest_of(&self, model: &str) -> Option<Option<&str>> {
        self.advert.as_ref().map(|a| {
            a.models
                .iter()
                .find(|m| m.name == model)
                .and_then(|m| m.digest.as_deref())
        })
    }
}

impl WorkerTable {
    pub fn on_advert(&mut self, source: PeerId, advert: Advert) {
        // Only the worker itself may speak for its id (gossipsub has
        // checked the signature of `source`).
        if advert.peer_id != source.to_base58() {
            return;
        }
        if let Some(&when) = self.unreachable.get(&source) {
            // Only an advert sent after the failed dial brings it back.
            let sent = Duration::from_millis(advert.sent_at_ms);
            let failed_at = Duration::from_millis(troop_protocol::policy::unix_ms())
                .saturating_sub(when.elapsed());
            if sent <= failed_at {
                return;
            }
            self.unreachable.remove(&source);
        }
        if !self.entries.contains_key(&source) && !self.make_room() {
            return;
        }
        let ttl = Duration::from_millis(advert.ttl_ms.clamp(1_000, 600_000));
        let models = advert.models.iter().map(|m| m.name.clone()).collect();
        let inflight = self
            .entries
            .get(&source)
            .map(|e| e.local_inflight)
            .unwrap_or(0);
        self.entries.insert(
            source,
            Entry {
                peer: source,
                advert: Some(advert),
                models,
                source: Source::Gossip,
                seen: Instant::now(),
                ttl,
                rtt: self.rtts.get(&source).copied(),
                local_inflight: inflight,
            },
        );
    }

    /// A provider found through the DHT (no advert, so no load figures).
    pub fn on_provider(&mut self, peer: PeerId, model: &str) {
        self.on_found(peer, model, Source::Dht);
    }

    /// A worker for `model` learnt from a lookup (not an advert): kept
    /// for `DHT_TTL` unless an advert replaces it.
    pub fn on_found(&mut self, peer: PeerId, model: &str, source: Source) {
        // The coordinator names live workers with the addresses they
        // registered: a fresh reason to try one marked unreachable.
        if source == Source::Coordinator {
            self.unreachable.remove(&peer);
        }
        if self
            .unreachable
            .get(&peer)
            .is_some_and(|t| t.elapsed() < DHT_TTL)
        {
            return;
        }
        if !self.entries.contains_key(&peer) && !self.make_room() {
            return;
        }
        let rtt = self.rtts.get(&peer).copied();
        let e = self.entries.entry(peer).or_insert_with(|| Entry {
            peer,
            advert: None,
            models: Vec::new(),
            source,
            seen: Instant::now(),
            ttl: DHT_TTL,
            rtt,
            local_inflight: 0,
        });
        if !e.models.iter().any(|m| m == model) {
            e.models.push(model.to_string());
        }
        if e.source != Source::Gossip {
            e.seen = Instant::now();
        }
    }

    /// A ping round trip to `peer`. Kept for workers in the table, and for
    /// at most [`MAX_RTTS`] other peers (a worker's advert may come after
    /// its first ping); when full, only the table's workers' stay.
    pub fn on_rtt(&mut self, peer: PeerId, rtt: Duration) {
        if let Some(e) = self.entries.get_mut(&peer) {
            e.rtt = Some(rtt);
        }
        if self.rtts.len() >= MAX_RTTS && !self.rtts.contains_key(&peer) {
            let entries = &self.entries;
            self.rtts.retain(|p, _| entries.contains_key(p));
        }
        if self.rtts.len() < MAX_RTTS + self.entries.len() || self.entries.contains_key(&peer) {
            self.rtts.insert(peer, rtt);
        }
    }

    /// Whether `peer` is in the table (live or not yet dropped).
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.entries.contains_key(peer)
    }

    pub fn forget(&mut self, peer: &PeerId) {
        self.entries.remove(peer);
        self.rtts.remove(peer);
    }

    /// A dial to `peer` failed: drop it from the table (and so from
    /// `/v1/models`) until it advertises again.
    pub fn mark_unreachable(&mut self, peer: &PeerId) {
        self.entries.remove(peer);
        self.rtts.remove(peer);
        if self.unreachable.len() >= MAX_ENTRIES {
            self.unreachable.retain(|_, t| t.elapsed() < DHT_TTL);
        }
        if self.unreachable.len() < MAX_ENTRIES {
            self.unreachable.insert(*peer, Instant::now());
        }
    }

    /// Drops expired rows when the table is full; false if still full.
    fn make_room(&mut self) -> bool {
        if self.entries.len() < MAX_ENTRIES {
            return true;
        }
        let now = Instant::now();
        self.entries
            .retain(|_, e| now.duration_since(e.seen) <= e.ttl);
        let live: std::collections::HashSet<PeerId> = self.entries.keys().copied().collect();
        self.rtts.retain(|p, _| live.contains(p));
        if self.entries.len() < MAX_ENTRIES {
            return true;
        }
        metrics::counter!("troop_limit_hits_total", "limit" => "worker_table").increment(1);
        false
    }

    pub fn add_inflight(&mut self, peer: &PeerId, delta: i32) {
        if let Some(e) = self.entries.get_mut(peer) {
            e.local_inflight = e.local_inflight.saturating_add_signed(delta);
        }
    }

    /// Takes a place on the best of `among` (each with its path rank, lower
    /// first; the list's order breaks ties) for one request, and returns
    /// its index in `among`. The place counts in the worker's score from
    /// now, so the requests of a burst that choose after this one see it
    /// and spread over the workers by their free slots instead of all
    /// choosing the worker that was best before any of them started.
    pub fn claim_best(&mut self, among: &[(PeerId, u8)]) -> Option<usize> {
        let mut best: Option<(usize, u8, f64)> = None;
        for (i, (peer, rank)) in among.iter().enumerate() {
            let score = self.entries.get(peer).map_or(f64::MAX, Self::score);
            let better = match best {
                None => true,
                Some((_, r, sc)) => (*rank, score) < (r, sc),
            };
            if better {
                best = Some((i, *rank, score));
            }
        }
        let (i, _, _) = best?;
        self.add_inflight(&among[i].0, 1);
        Some(i)
    }

    /// The digest `peer` advertises for `model`, when it names one.
    pub fn peer_digest(&self, peer: &PeerId, model: &str) -> Option<String> {
        self.entries
            .get(peer)?
            .digest_of(model)
            .flatten()
            .map(String::from)
    }

    /// Jobs this gateway has running on `peer`.
    pub fn inflight(&self, peer: &PeerId) -> u32 {
        self.entries
            .get(peer)
            .map(|e| e.local_inflight)
            .unwrap_or(0)
    }

    /// Live workers with their models and our round trip to them.
    pub fn workers(&self) -> Vec<(PeerId, Vec<String>, Option<Duration>)> {
        let mut v: Vec<_> = self
            .live()
            .map(|e| (e.peer, e.models.clone(), e.rtt))
            .collect();
        v.sort_by_key(|(p, _, _)| p.to_base58());
        v
    }

    fn live(&self) -> impl Iterator<Item = &Entry> {
        let now = Instant::now();
        self.entries
            .values()
            .filter(move |e| now.duration_since(e.seen) <= e.ttl)
    }

    /// Lower is better: the expected wait for the first token.
    ///
    /// `rtt + ttft x (1 + jobs ahead)`, where `rtt` is our own ping round
    /// trip to the worker, `ttft` its advertised recent time to first token,
    /// and "jobs ahead" the larger of its advertised active jobs and the jobs
    /// this gateway has running there (adverts lag by a few seconds). A
    /// worker at its job cap would answer `busy`, so it goes last. With no
    /// measurements yet, 5 ms and 150 ms stand in.
    pub fn score(e: &Entry) -> f64 {
        let rtt = e
            .rtt
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(DEFAULT_RTT_MS);
        let (ttft, active, max) = match &e.advert {
            Some(a) => (
                a.ttft_ms.unwrap_or(DEFAULT_TTFT_MS),
                a.active_jobs + a.queue_depth,
                a.max_jobs,
            ),
            None => (DEFAULT_TTFT_MS, 0, u32::MAX),
        };
        let ahead = active.max(e.local_inflight);
        let full = if ahead >= max { 1.0e6 } else { 0.0 };
        rtt + ttft * (1.0 + f64::from(ahead)) + full
    }

    /// Workers serving `model`, best first.
    pub fn candidates(&self, model: &str) -> Vec<PeerId> {
        self.candidates_for(model, false, None)
    }

    /// Workers of `model`, best first; with `embeddings`, only those whose
    /// advert says the model embeds (or that sent no advert yet).
    ///
    /// Workers that serve the name with different weights (digests) are
    /// different models: with `pin` (`sha256:<prefix>`), only workers
    /// advertising a digest it names; without, only those of one digest,
    /// the one most workers advertise (ties: the one whose best worker
    /// scores best), so that retries and resumed answers stay on the same
    /// weights. Workers known only from a lookup (no advert yet, so no
    /// digest) go with any unpinned request.
    pub fn candidates_for(&self, model: &str, embeddings: bool, pin: Option<&str>) -> Vec<PeerId> {
        let mut v: Vec<(&Entry, f64)> = self
            .live()
            .filter(|e| e.models.iter().any(|m| m == model))
            .filter(|e| {
                !embeddings
                    || e.advert
                        .as_ref()
                        .is_none_or(|a| a.models.iter().any(|m| m.name == model && m.embeds))
            })
            .filter(|e| match pin {
                Some(pin) => digest_matches(e.digest_of(model).flatten(), pin),
                None => true,
            })
            .map(|e| (e, Self::score(e)))
            .collect();
        v.sort_by(|a, b| a.1.total_cmp(&b.1));
        if pin.is_none() {
            let chosen = chosen_digest(v.iter().map(|(e, _)| e.digest_of(model)));
            v.retain(|(e, _)| e.digest_of(model).is_none_or(|d| d == chosen.as_deref()));
        }
        v.into_iter().map(|(e, _)| e.peer).collect()
    }

    /// Every model on the mesh with its workers.
    pub fn rows(&self) -> Vec<WorkerRow> {
        let mut rows = Vec::new();
        for e in self.live() {
            for m in &e.models {
                let a = e.advert.as_ref();
                rows.push(WorkerRow {
                    model: m.clone(),
                    peer_id: e.peer.to_base58(),
                    source: e.source,
                    queue_depth: a.map(|a| a.queue_depth),
                    active_jobs: a.map(|a| a.active_jobs),
                    max_jobs: a.map(|a| a.max_jobs),
                    ttft_ms: a.and_then(|a| a.ttft_ms),
                    tokens_per_s: a.and_then(|a| a.tokens_per_s),
                    rtt_ms: e.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    hardware_multiplier: a.map(|a| a.hardware_multiplier),
                    context_length: a
                        .and_then(|a| a.models.iter().find(|x| &x.name == m))
                        .and_then(|x| x.context_length),
                    digest: e.digest_of(m).flatten().map(String::from),
                    runtime: a
                        .and_then(|a| a.models.iter().find(|x| &x.name == m))
                        .and_then(|x| x.runtime.clone()),
                    score: Self::score(e),
                });
            }
        }
        rows.sort_by(|a, b| a.model.cmp(&b.model).then(a.score.total_cmp(&b.score)));
        rows
    }

    /// Every model on the mesh: its workers, and how many of them
    /// advertise each digest (workers without an advert yet are counted
    /// under none), most first.
    pub fn models(&self) -> Vec<ModelSummary> {
        let mut by_name: HashMap<String, ModelSummary> = HashMap::new();
        for e in self.live() {
            for m in &e.models {
                let s = by_name.entry(m.clone()).or_insert_with(|| ModelSummary {
                    id: m.clone(),
                    workers: 0,
                    digests: Vec::new(),
                });
                s.workers += 1;
                if let Some(d) = e.digest_of(m).flatten() {
                    match s.digests.iter_mut().find(|x| x.digest == d) {
                        Some(x) => x.workers += 1,
                        None => s.digests.push(DigestCount {
                            digest: d.to_string(),
                            workers: 1,
                        }),
                    }
                }
            }
        }
        let mut v: Vec<_> = by_name.into_values().collect();
        for s in &mut v {
            s.digests
                .sort_by(|a, b| b.workers.cmp(&a.workers).then(a.digest.cmp(&b.digest)));
        }
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use troop_protocol::advert::ModelAdvert;

    fn advert(peer: &PeerId, ttft: f64, active: u32) -> Advert {
        Advert {
            peer_id: peer.to_base58(),
            addresses: vec![],
            models: vec![ModelAdvert {
                name: "m".into(),
                digest: None,
                runtime: None,
                context_length: None,
                embeds: false,
            }],
            queue_depth: 0,
            active_jobs: active,
            max_jobs: 4,
            ttft_ms: Some(ttft),
            tokens_per_s: None,
            hardware_multiplier: 1.0,
            ttl_ms: 10_000,
            sent_at_ms: 0,
        }
    }

    fn with_digest(peer: &PeerId, ttft: f64, digest: Option<&str>) -> Advert {
        let mut a = advert(peer, ttft, 0);
        a.models[0].digest = digest.map(String::from);
        a
    }

    #[test]
    fn workers_of_other_weights_are_another_model_and_a_pin_picks_its_own() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let mut t = WorkerTable::default();
        let (a1, a2, b1, lookup) = (
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
        );
        // The fastest worker serves other weights than most.
        t.on_advert(b1, with_digest(&b1, 10.0, Some(&b)));
        t.on_advert(a1, with_digest(&a1, 50.0, Some(&a)));
        t.on_advert(a2, with_digest(&a2, 60.0, Some(&a)));
        t.on_provider(lookup, "m");
        assert_eq!(t.candidates("m"), vec![a1, a2, lookup]);
        assert_eq!(
            t.candidates_for("m", false, Some("sha256:BBBBbbbb")),
            vec![b1]
        );
        assert_eq!(t.candidates_for("m", false, Some(&a)), vec![a1, a2]);
        assert!(
            t.candidates_for("m", false, Some("sha256:cccccccc"))
                .is_empty()
        );
        let m = t.models();
        assert_eq!(m[0].workers, 4);
        assert_eq!(
            m[0].digests,
            vec![
                DigestCount {
                    digest: a.clone(),
                    workers: 2
                },
                DigestCount {
                    digest: b.clone(),
                    workers: 1
                },
            ]
        );
        // Equal counts: the weights of the best-scored worker.
        t.on_advert(a2, with_digest(&a2, 60.0, Some(&b)));
        assert_eq!(t.candidates("m"), vec![b1, a2, lookup]);
        let rows = t.rows();
        assert_eq!(
            rows.iter()
                .find(|r| r.peer_id == b1.to_base58())
                .and_then(|r| r.digest.clone()),
            Some(b)
        );
    }

    #[test]
    fn picks_by_latency_and_load_not_at_random() {
        let mut t = WorkerTable::default();
        let fast = PeerId::random();
        let slow = PeerId::random();
        let busy = PeerId::random();
        let full = PeerId::random();
        t.on_advert(fast, advert(&fast, 50.0, 0));
        t.on_advert(slow, advert(&slow, 400.0, 0));
        t.on_advert(busy, advert(&busy, 50.0, 3));
        t.on_advert(full, advert(&full, 10.0, 4));
        assert_eq!(t.candidates("m"), vec![fast, busy, slow, full]);
        // A slow network path counts too.
        t.on_rtt(fast, Duration::from_millis(500));
        assert_eq!(t.candidates("m")[0], busy);
        // Our own in-flight jobs count before the adverts catch up: five of
        // ours on `busy` put it past its cap of four, behind everyone.
        t.add_inflight(&busy, 3);
        t.add_inflight(&busy, 2);
        assert_eq!(t.candidates("m").last(), Some(&busy));
        t.add_inflight(&busy, -5);
        assert_eq!(t.candidates("m")[0], busy);
        assert!(t.candidates("other").is_empty());
    }

    #[test]
    fn a_burst_claims_places_and_spreads_over_the_workers_by_free_slots() {
        let mut t = WorkerTable::default();
        let workers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        for w in &workers {
            t.on_advert(*w, advert(w, 50.0, 0));
        }
        let among: Vec<(PeerId, u8)> = workers.iter().map(|w| (*w, 0)).collect();
        // Sixteen requests choose before any of them is sent: four each,
        // none past a worker's cap of four.
        let mut got = std::collections::HashMap::new();
        for _ in 0..16 {
            let i = t.claim_best(&among).expect("a worker");
            *got.entry(among[i].0).or_insert(0) += 1;
        }
        for w in &workers {
            assert_eq!(got.get(w), Some(&4), "{got:?}");
            assert_eq!(t.inflight(w), 4);
        }
        // A direct path still goes before a relayed one with more room.
        let mixed = vec![(workers[0], 1), (workers[1], 0)];
        t.add_inflight(&workers[1], 2);
        assert_eq!(t.claim_best(&mixed), Some(1));
        assert_eq!(t.claim_best(&[]), None);
    }

    #[test]
    fn round_trips_of_peers_outside_the_table_are_bounded() {
        let mut t = WorkerTable::default();
        let w = PeerId::random();
        t.on_advert(w, advert(&w, 50.0, 0));
        for _ in 0..MAX_RTTS + 500 {
            t.on_rtt(PeerId::random(), Duration::from_millis(3));
        }
        assert!(t.rtts.len() <= MAX_RTTS + 1, "{}", t.rtts.len());
        // A worker's round trip is always kept.
        t.on_rtt(w, Duration::from_millis(7));
        assert_eq!(t.rtts.get(&w), Some(&Duration::from_millis(7)));
        t.forget(&w);
        assert!(!t.rtts.contains_key(&w));
    }

    #[test]
    fn job_counts_of_a_worker_without_an_advert_are_unknown_not_zero() {
        let mut t = WorkerTable::default();
        let p = PeerId::random();
        t.on_provider(p, "m");
        let row = t.rows().pop().expect("a row");
        assert_eq!(
            (row.active_jobs, row.max_jobs, row.queue_depth),
            (None, None, None)
        );
        let a = PeerId::random();
        t.on_advert(a, advert(&a, 50.0, 2));
        let row = t
            .rows()
            .into_iter()
            .find(|r| r.peer_id == a.to_base58())
            .expect("a row");
        assert_eq!((row.active_jobs, row.max_jobs), (Some(2), Some(4)));
    }

    #[test]
    fn adverts_for_someone_else_are_ignored() {
        let mut t = WorkerTable::default();
        let a = PeerId::random();
        let b = PeerId::random();
        t.on_advert(a, advert(&b, 1.0, 0));
        assert!(t.candidates("m").is_empty());
    }
}
