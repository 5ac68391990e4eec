//! Discovery: provider records in the DHT (announced, re-announced,
//! retried when they reached nobody), provider lookups that resolve and
//! dial what they find before answering, and re-bootstrapping while the
//! routing table is short.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::kad::{self, GetClosestPeersOk, GetProvidersOk, QueryId, QueryResult, RecordKey};
use libp2p::{Multiaddr, PeerId, Swarm};
use tokio::sync::oneshot;

use super::swarm::Behaviour;

struct Lookup {
    reply: Option<oneshot::Sender<Vec<PeerId>>>,
    found: HashSet<PeerId>,
    unresolved: HashSet<PeerId>,
    provider_query_done: bool,
}

pub(super) struct Discovery {
    provider_queries: HashMap<QueryId, u64>,
    closest_queries: HashMap<QueryId, (u64, PeerId)>,
    lookups: HashMap<u64, Lookup>,
    next_lookup: u64,
    bootstrapped: bool,
    /// When to bootstrap the DHT again while its table is short, and the
    /// wait after that (doubling up to a minute).
    rebootstrap: (Instant, Duration),
    /// Kademlia's k (`NetConfig::dht_replication`).
    dht_replication: usize,
    provided: HashSet<Vec<u8>>,
    /// Keys whose last announcement timed out before reaching the closest
    /// peers (libp2p-kad then stores the record on no other node): announce again
    /// at the given time, backing off from 2 s to the minute of `reprovide`.
    provide_retry: HashMap<Vec<u8>, (Instant, Duration)>,
    bootstrap: Vec<Multiaddr>,
}

impl Discovery {
    pub(super) fn new(bootstrap: Vec<Multiaddr>, dht_replication: usize) -> Self {
        Self {
            provider_queries: HashMap::new(),
            closest_queries: HashMap::new(),
            lookups: HashMap::new(),
            next_lookup: 0,
            bootstrapped: false,
            rebootstrap: (Instant::now(), Duration::from_secs(3)),
            dht_replication,
            provided: HashSet::new(),
            provide_retry: HashMap::new(),
            bootstrap,
        }
    }

    /// Every few seconds: alone, dial the bootstrap peers again (they may
    /// have started after us); else top up the routing table and retry
    /// the announcements that reached nobody.
    pub(super) fn redial(&mut self, swarm: &mut Swarm<Behaviour>) {
        if swarm.connected_peers().next().is_none() {
            for addr in &self.bootstrap {
                let _ = swarm.dial(addr.clone());
            }
        } else {
            self.bootstrap_if_short(swarm);
            self.retry_providing(swarm);
        }
    }

    /// Announces a provider record for `key` (and again every minute).
    pub(super) fn provide(&mut self, swarm: &mut Swarm<Behaviour>, key: Vec<u8>) {
        self.provided.insert(key.clone());
        if let Some(kad) = swarm.behaviour_mut().kad.as_mut()
            && let Err(e) = kad.start_providing(RecordKey::new(&key))
        {
            tracing::warn!(error = %e, "start_providing failed");
        }
    }

    /// Starts a provider lookup; `reply` gets the providers once they are
    /// resolved and dialled (empty at once when the DHT is off).
    pub(super) fn find_providers(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        key: Vec<u8>,
        reply: oneshot::Sender<Vec<PeerId>>,
    ) {
        let Some(kad) = swarm.behaviour_mut().kad.as_mut() else {
            let _ = reply.send(Vec::new());
            return;
        };
        let id = self.next_lookup;
        self.next_lookup += 1;
        let q = kad.get_providers(RecordKey::new(&key));
        self.provider_queries.insert(q, id);
        self.lookups.insert(
            id,
            Lookup {
                reply: Some(reply),
                found: HashSet::new(),
                unresolved: HashSet::new(),
                provider_query_done: false,
            },
        );
    }

    /// A dial failed: a provider being resolved is settled, unless a
    /// closest-peers query for it is still out (then keep waiting).
    pub(super) fn dial_failed(&mut self, peer: PeerId) {
        if !self.closest_queries.values().any(|(_, t)| *t == peer) {
            self.provider_settled(peer);
        }
    }

    /// The first DHT bootstrap runs before any connection is up; when the
    /// peers it asked were busy (a hub turning joiners away), the table
    /// stays short until Kademlia's own 5-minute refresh. Bootstrap again
    /// while it holds fewer than one bucket (k, 20 by default) of peers, backing off
    /// from 3 s to a minute.
    fn bootstrap_if_short(&mut self, swarm: &mut Swarm<Behaviour>) {
        let now = Instant::now();
        if now < self.rebootstrap.0 {
            return;
        }
        let Some(kad) = swarm.behaviour_mut().kad.as_mut() else {
            return;
        };
        let known: usize = kad.kbuckets().map(|b| b.num_entries()).sum();
        if known >= self.dht_replication {
            return;
        }
        if kad.bootstrap().is_ok() {
            tracing::debug!(known, "DHT table short: bootstrapping again");
        }
        let wait = self.rebootstrap.1;
        self.rebootstrap = (now + wait, (wait * 2).min(Duration::from_secs(60)));
    }

    /// Announces again the keys whose announcement timed out, when due.
    fn retry_providing(&mut self, swarm: &mut Swarm<Behaviour>) {
        let now = Instant::now();
        let due: Vec<Vec<u8>> = self
            .provide_retry
            .iter()
            .filter(|(k, (at, _))| *at <= now && self.provided.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            // Not again until this attempt has answered.
            if let Some((at, _)) = self.provide_retry.get_mut(&k) {
                *at = now + Duration::from_secs(60);
            }
            if let Some(kad) = swarm.behaviour_mut().kad.as_mut()
                && let Err(e) = kad.start_providing(RecordKey::new(&k))
            {
                tracing::debug!(error = %e, "start_providing failed");
            }
        }
    }

    pub(super) fn reprovide(&mut self, swarm: &mut Swarm<Behaviour>) {
        // Keys waiting for a retry are announced by `retry_providing`.
        let keys: Vec<Vec<u8>> = self
            .provided
            .iter()
            .filter(|k| !self.provide_retry.contains_key(*k))
            .cloned()
            .collect();
        if let Some(kad) = swarm.behaviour_mut().kad.as_mut() {
            for k in keys {
                if let Err(e) = kad.start_providing(RecordKey::new(&k)) {
                    tracing::debug!(error = %e, "start_providing failed");
                }
            }
        }
    }

    fn finish_lookup_if_done(&mut self, id: u64) {
        let done = self
            .lookups
            .get(&id)
            .is_some_and(|l| l.provider_query_done && l.unresolved.is_empty());
        if done
            && let Some(mut l) = self.lookups.remove(&id)
            && let Some(reply) = l.reply.take()
        {
            let _ = reply.send(l.found.into_iter().collect());
        }
    }

    pub(super) fn on_kad(&mut self, swarm: &mut Swarm<Behaviour>, ev: kad::Event) {
        match ev {
            kad::Event::OutboundQueryProgressed {
                id, result, stats, ..
            } => match result {
                QueryResult::GetProviders(res) => {
                    let Some(&lookup) = self.provider_queries.get(&id) else {
                        return;
                    };
                    // libp2p-kad reports `FoundProviders` for every peer's
                    // answer, with an empty set from a peer that only knew
                    // closer peers: only a non-empty set is an answer.
                    let found = match &res {
                        Ok(GetProvidersOk::FoundProviders { providers, .. }) => {
                            let local = *swarm.local_peer_id();
                            providers.iter().filter(|p| **p != local).count()
                        }
                        _ => 0,
                    };
                    let last = !matches!(res, Ok(GetProvidersOk::FoundProviders { .. }));
                    tracing::debug!(
                        target: "troop_node::dht",
                        found,
                        requests = stats.num_requests(),
                        ok = stats.num_successes(),
                        failed = stats.num_failures(),
                        ms = stats.duration().map(|d| d.as_millis()).unwrap_or(0),
                        "provider lookup step"
                    );
                    match res {
                        Ok(GetProvidersOk::FoundProviders { providers, .. }) => {
                            let local = *swarm.local_peer_id();
                            for p in providers.into_iter().filter(|p| *p != local) {
                                let connected = swarm.is_connected(&p);
                                let Some(l) = self.lookups.get_mut(&lookup) else {
                                    break;
                                };
                                if !l.found.insert(p) {
                                    continue;
                                }
                                if !connected {
                                    // Dial now, while the query still holds the
                                    // addresses the provider record came with;
                                    // ask the DHT for them only if that fails.
                                    if swarm.dial(p).is_err()
                                        && let Some(kad) = swarm.behaviour_mut().kad.as_mut()
                                    {
                                        let q = kad.get_closest_peers(p);
                                        self.closest_queries.insert(q, (lookup, p));
                                    }
                                    if let Some(l) = self.lookups.get_mut(&lookup) {
                                        l.unresolved.insert(p);
                                    }
                                }
                            }
                            // One answer is enough: stop the query early.
                            if found > 0
                                && let Some(kad) = swarm.behaviour_mut().kad.as_mut()
                                && let Some(mut q) = kad.query_mut(&id)
                            {
                                q.finish();
                            }
                        }
                        Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => {}
                        Err(e) => tracing::debug!(error = %e, "provider lookup failed"),
                    }
                    if found == 0 && !last {
                        // Not an answer yet: the query goes on to closer peers.
                        return;
                    }
                    // The first answer (or the end of the query) settles the lookup.
                    self.provider_queries.remove(&id);
                    if let Some(l) = self.lookups.get_mut(&lookup) {
                        l.provider_query_done = true;
                    }
                    self.finish_lookup_if_done(lookup);
                }
                QueryResult::GetClosestPeers(res) => {
                    let Some((lookup, target)) = self.closest_queries.remove(&id) else {
                        return;
                    };
                    let peers = match res {
                        Ok(GetClosestPeersOk { peers, .. }) => peers,
                        Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                    };
                    for info in peers.into_iter().filter(|i| i.peer_id == target) {
                        for addr in info.addrs {
                            swarm.add_peer_address(target, addr);
                        }
                    }
                    if let Err(e) = swarm.dial(target) {
                        tracing::debug!(peer = %target, error = %e, "could not dial provider");
                    }
                    if let Some(l) = self.lookups.get_mut(&lookup) {
                        l.unresolved.remove(&target);
                    }
                    self.finish_lookup_if_done(lookup);
                }
                QueryResult::StartProviding(Err(e)) => {
                    // Nothing was stored: try again soon, not in a minute.
                    let key = e.key().to_vec();
                    let now = Instant::now();
                    let wait = self
                        .provide_retry
                        .get(&key)
                        .map_or(Duration::from_secs(2), |(_, w)| {
                            (*w * 2).min(Duration::from_secs(60))
                        });
                    self.provide_retry.insert(key, (now + wait, wait));
                    tracing::debug!(
                        target: "troop_node::dht",
                        error = %e,
                        requests = stats.num_requests(),
                        ok = stats.num_successes(),
                        "providing not replicated yet"
                    )
                }
                QueryResult::StartProviding(Ok(ok)) => {
                    self.provide_retry.remove(ok.key.as_ref());
                    tracing::debug!(
                        target: "troop_node::dht",
                        requests = stats.num_requests(),
                        ok = stats.num_successes(),
                        failed = stats.num_failures(),
                        "provider record stored"
                    )
                }
                QueryResult::Bootstrap(Ok(_)) => {}
                _ => {}
            },
            kad::Event::RoutingUpdated { peer, .. } => {
                tracing::trace!(%peer, "routing table updated");
                if !self.bootstrapped {
                    self.bootstrapped = true;
                    if let Some(kad) = swarm.behaviour_mut().kad.as_mut() {
                        let _ = kad.bootstrap();
                    }
                    self.reprovide(swarm);
                }
            }
            _ => {}
        }
    }

    /// A provider we were resolving is now connected (or could not be).
    pub(super) fn provider_settled(&mut self, peer: PeerId) {
        let ids: Vec<u64> = self
            .lookups
            .iter_mut()
            .filter_map(|(id, l)| l.unresolved.remove(&peer).then_some(*id))
            .collect();
        for id in ids {
            self.finish_lookup_if_done(id);
        }
    }
}
