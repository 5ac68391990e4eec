//! What the worker tells the mesh: its signed advert (gossip) and the DHT
//! provider records of its models, refreshed from the upstream's listing.

use super::*;

pub(super) fn advert(s: &Shared) -> Advert {
    let active = s.stats.active_jobs.load(Ordering::Relaxed);
    Advert {
        peer_id: s.peer_id.to_base58(),
        addresses: s.net.advertised_addrs(),
        models: s.models.reading().map(|m| m.clone()).unwrap_or_default(),
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
        let names: Vec<String> = s
            .models
            .reading()
            .map(|m| m.iter().map(|m| m.name.clone()).collect())
            .unwrap_or_default();
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
        if let Some(mut h) = s.upstream_health.locked() {
            *h = UpstreamHealth {
                ok: listed.is_ok(),
                checked_at_ms: unix_ms(),
                error: listed.as_ref().err().map(|e| format!("{e:#}")),
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
