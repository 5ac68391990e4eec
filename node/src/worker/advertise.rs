//! What the worker tells the mesh: its signed advert (gossip) and the DHT
//! provider records of its models, refreshed from the upstream's listing.

use super::*;

/// The models to advertise: none while the upstream is withdrawn.
pub(super) fn served_models(s: &Shared) -> Vec<ModelAdvert> {
    if s.upstream_health.locked().is_some_and(|h| h.withdrawn) {
        return Vec::new();
    }
    s.models.reading().map(|m| m.clone()).unwrap_or_default()
}

pub(super) fn advert(s: &Shared) -> Advert {
    let active = s.stats.active_jobs.load(Ordering::Relaxed);
    Advert {
        peer_id: s.peer_id.to_base58(),
        addresses: s.net.advertised_addrs(),
        models: served_models(s),
        queue_depth: active.saturating_sub(s.cfg.max_jobs as u32),
        active_jobs: active,
        max_jobs: s.cfg.max_jobs as u32,
        ttft_ms: s.stats.ttft_ms(),
        tokens_per_s: s.stats.tokens_per_s(),
        hardware_multiplier: s.multiplier.reading().map(|m| *m).unwrap_or(1.0),
        ttl_ms: (s.cfg.advert_interval.as_millis() as u64).saturating_mul(3),
        sent_at_ms: unix_ms(),
    }
}

pub(super) async fn advertise_loop(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(s.cfg.advert_interval);
    let mut provided: Vec<String> = Vec::new();
    loop {
        tick.tick().await;
        let names: Vec<String> = served_models(&s).into_iter().map(|m| m.name).collect();
        for n in names.iter().filter(|n| !provided.contains(n)) {
            s.net.provide(model_key(n)).await;
        }
        provided = names;
        s.net.publish(advert(&s).encode()).await;
    }
}

pub(super) async fn refresh_models_loop(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(s.cfg.model_refresh_interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        let listed = s.upstream.models().await;
        let now = unix_ms();
        if let Some(mut h) = s.upstream_health.locked() {
            let down_since = match (&listed, h.down_since_ms) {
                (Ok(_), _) => None,
                (Err(_), Some(t)) => Some(t),
                (Err(_), None) => Some(now),
            };
            let gone = s.cfg.upstream_gone_after.as_millis() as u64;
            let withdrawn = down_since.is_some_and(|t| now.saturating_sub(t) >= gone);
            if withdrawn && !h.withdrawn {
                tracing::warn!(
                    upstream = %s.cfg.upstream,
                    down_secs = now.saturating_sub(down_since.unwrap_or(now)) / 1000,
                    "the model server has not answered for --upstream-gone-secs; adverts withdrawn until it is back"
                );
                metrics::counter!("troop_upstream_withdrawals_total").increment(1);
            } else if h.withdrawn && !withdrawn {
                tracing::info!(upstream = %s.cfg.upstream, "the model server is back; advertising again");
            }
            *h = UpstreamHealth {
                ok: listed.is_ok(),
                checked_at_ms: now,
                error: listed.as_ref().err().map(|e| format!("{e:#}")),
                down_since_ms: down_since,
                withdrawn,
            };
        }
        match listed {
            Ok(models) => {
                let changed = s.models.reading().map(|m| *m != models).unwrap_or(true);
                if changed {
                    tracing::info!(models = ?models.iter().map(|m| &m.name).collect::<Vec<_>>(), "upstream models changed");
                    if let Some(mut m) = s.models.writing() {
                        *m = models;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "upstream did not list its models"),
        }
    }
}
