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
    let mut dialed = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(NetEvent::Advert { source, data })) => {
                if let Some(a) = Advert::decode(&data) {
                    if dial_workers && dialed.insert(source) {
                        for addr in a
                            .addresses
                            .iter()
                            .filter_map(|s| s.parse::<Multiaddr>().ok())
                        {
                            if network::peer_of(&addr) == Some(source) {
                                net.dial(addr).await;
                            }
                        }
                    }
                    table.on_advert(source, a);
                }
            }
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
            r.queue_depth,
            format!("{}/{}", r.active_jobs, r.max_jobs),
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
    let mut checks = vec![
        Check {
            name: "listen addresses",
            ok: !st.listen_addrs.is_empty(),
            detail: st.listen_addrs.join(", "),
            advice: "pass --listen /ip4/0.0.0.0/tcp/4001 (and open that port) so others can reach you",
        },
        Check {
            name: "NAT status (AutoNAT)",
            ok: !st.nat_status.starts_with("private"),
            detail: st.nat_status.clone(),
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
                "{} punched direct by DCUtR ({}), {} relayed only ({})",
                st.hole_punched.len(),
                st.hole_punched.join(", "),
                st.relayed_peers.len(),
                st.relayed_peers.join(", ")
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
