//! `troop models` and `troop doctor`: short-lived nodes that look at the mesh.

use std::time::{Duration, Instant};

use libp2p::Multiaddr;
use troop_protocol::advert::Advert;

use crate::gateway::table::{WorkerRow, WorkerTable};
use crate::network::{self, NetConfig, NetEvent};

/// Joins the mesh for `wait`, collecting adverts, and returns the table.
pub async fn survey(
    bootstrap: Vec<Multiaddr>,
    wait: Duration,
) -> anyhow::Result<(Vec<WorkerRow>, network::NetStatus)> {
    survey_with(bootstrap, Vec::new(), false, wait).await
}

/// [`survey`], optionally through `relays` and dialing every worker heard
/// of (so hole punching can be seen).
pub async fn survey_with(
    bootstrap: Vec<Multiaddr>,
    relays: Vec<Multiaddr>,
    dial_workers: bool,
    wait: Duration,
) -> anyhow::Result<(Vec<WorkerRow>, network::NetStatus)> {
    let mut cfg = NetConfig::new(troop_protocol::identity::generate());
    cfg.bootstrap = bootstrap;
    cfg.relays = relays;
    let (net, mut events) = network::spawn(cfg).await?;
    let mut table = WorkerTable::default();
    let mut addrs: std::collections::HashMap<libp2p::PeerId, Vec<Multiaddr>> =
        std::collections::HashMap::new();
    let started = tokio::time::Instant::now();
    let deadline = started + wait;
    // Workers not reached by the middle of the wait are dialed once more.
    let mut redial = dial_workers.then_some(started + wait / 2);
    loop {
        if let Some(at) = redial
            && tokio::time::Instant::now() >= at
        {
            redial = None;
            for (peer, list) in &addrs {
                if net.path(peer) == network::Path::None {
                    net.dial_peer(*peer, list.clone()).await;
                }
            }
        }
        let until = redial.map_or(deadline, |r| r.min(deadline));
        match tokio::time::timeout_at(until, events.recv()).await {
            Ok(Some(NetEvent::Advert { source, data })) => {
                if let Some(a) = Advert::decode(&data) {
                    if dial_workers {
                        let list: Vec<Multiaddr> = a
                            .addresses
                            .iter()
                            .filter_map(|s| s.parse::<Multiaddr>().ok())
                            .filter(|m| network::peer_of(m) == Some(source))
                            .collect();
                        if addrs.insert(source, list.clone()).is_none() {
                            net.dial_peer(source, list).await;
                        }
                    }
                    table.on_advert(source, a);
                }
            }
            Err(_) if tokio::time::Instant::now() < deadline => {}
            Ok(Some(NetEvent::Rtt { peer, rtt })) => table.on_rtt(peer, rtt),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let status = net.status().await;
    net.shutdown();
    Ok((table.rows(), status))
}

pub fn print_models(rows: &[WorkerRow]) {
    if rows.is_empty() {
        println!(
            "no models found on the mesh (is a worker running, and did you pass --bootstrap?)"
        );
        return;
    }
    println!(
        "{:<28} {:<54} {:>6} {:>8} {:>9} {:>8}",
        "MODEL", "WORKER", "QUEUE", "ACTIVE", "TTFT ms", "RTT ms"
    );
    for r in rows {
        let f = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<28} {:<54} {:>6} {:>8} {:>9} {:>8}",
            r.model,
            r.peer_id,
            r.queue_depth.map_or("-".into(), |q| q.to_string()),
            match (r.active_jobs, r.max_jobs) {
                (Some(a), Some(m)) => format!("{a}/{m}"),
                _ => "-".into(),
            },
            f(r.ttft_ms),
            f(r.rtt_ms)
        );
    }
}

/// One line of the doctor's report.
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    pub advice: &'static str,
}

pub async fn doctor(
    bootstrap: Vec<Multiaddr>,
    relays: Vec<Multiaddr>,
    coordinator: Option<String>,
    wait: Duration,
) -> anyhow::Result<Vec<Check>> {
    let started = Instant::now();
    let had_bootstrap = !bootstrap.is_empty();
    let (rows, st) = survey_with(bootstrap, relays, true, wait).await?;
    let private = st.nat == "private";
    let workers: std::collections::BTreeSet<String> =
        rows.iter().map(|r| r.peer_id.clone()).collect();
    let of_workers = |v: &[String]| -> Vec<String> {
        v.iter().filter(|p| workers.contains(*p)).cloned().collect()
    };
    let punched = of_workers(&st.hole_punched);
    let relayed = of_workers(&st.relayed_peers);
    let mut checks = vec![
        Check {
            name: "listen addresses",
            ok: !st.listen_addrs.is_empty(),
            detail: st.listen_addrs.join(", "),
            advice: "pass --listen /ip4/0.0.0.0/tcp/4001 (and open that port) so others can reach you",
        },
        Check {
            name: "NAT status (AutoNAT)",
            ok: !private || !st.relay_reservations.is_empty(),
            detail: if private && !st.relay_reservations.is_empty() {
                format!("{}, reachable through a relay", st.nat_status)
            } else {
                st.nat_status.clone()
            },
            advice: "you are behind NAT: forward a port to this machine, or use a relay (the node reserves one when a relay peer is known)",
        },
        Check {
            name: "relay reservation",
            ok: !private || !st.relay_reservations.is_empty(),
            detail: if st.relay_reservations.is_empty() {
                if private {
                    "none: behind NAT and no relay accepted us yet".into()
                } else {
                    "none (only needed behind NAT)".into()
                }
            } else {
                format!("held by {}", st.relay_reservations.join(", "))
            },
            advice: "pass --relay with a relay's address (troop relay), or --bootstrap a relay, or ask the coordinator's operator to list one in /bootstrap",
        },
        Check {
            name: "paths to workers",
            ok: true,
            detail: format!(
                "{} direct, of which {} punched by DCUtR ({}); {} relayed only ({})",
                workers
                    .iter()
                    .filter(|w| st.connected_peers.contains(w) && !st.relayed_peers.contains(w))
                    .count(),
                punched.len(),
                punched.join(", "),
                relayed.len(),
                relayed.join(", ")
            ),
            advice: "",
        },
        Check {
            name: "peers found",
            ok: !st.connected_peers.is_empty(),
            detail: format!(
                "{} connected, {} in the DHT routing table",
                st.connected_peers.len(),
                st.routing_table_peers
            ),
            advice: if had_bootstrap {
                "the bootstrap peers did not answer: check the address (it must end in /p2p/<PeerId>) and that the node runs"
            } else {
                "pass --bootstrap with the address a worker or gateway logs at start, or ask the coordinator's /bootstrap"
            },
        },
        Check {
            name: "workers found",
            ok: !rows.is_empty(),
            detail: format!(
                "{} model entries from adverts after {:.1} s",
                rows.len(),
                started.elapsed().as_secs_f64()
            ),
            advice: "no worker advert arrived: start a worker, or wait a few seconds and try again",
        },
    ];
    if let Some(url) = coordinator {
        let client = crate::coordinator_client::CoordinatorClient::new(
            &url,
            troop_protocol::identity::generate(),
        );
        let res = client.health().await;
        checks.push(Check {
            name: "coordinator",
            ok: res.is_ok(),
            detail: match res {
                Ok(v) => format!(
                    "{url} answers (key {})",
                    v.get("kid").and_then(|k| k.as_str()).unwrap_or("?")
                ),
                Err(e) => format!("{url}: {e}"),
            },
            advice: "check --coordinator (TROOP_COORDINATOR) and that the coordinator runs",
        });
    }
    Ok(checks)
}
