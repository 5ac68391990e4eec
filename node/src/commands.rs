//! `troop models` and `troop doctor`: short-lived nodes that look at the
//! mesh; `troop account`: one's own balance and history.

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
                        let list: Vec<Multiaddr> = network::dialable(
                            a.addresses
                                .iter()
                                .filter_map(|s| s.parse::<Multiaddr>().ok())
                                .filter(|m| network::peer_of(m) == Some(source))
                                .collect(),
                        );
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

/// Peers to join through, from the coordinator's `GET /bootstrap` (its
/// relays and a few live workers), as the gateway finds them.
pub async fn bootstrap_from(coordinator: &str) -> anyhow::Result<Vec<Multiaddr>> {
    let client = crate::coordinator_client::CoordinatorClient::new(
        coordinator,
        troop_protocol::identity::generate(),
    );
    let b = client
        .bootstrap()
        .await
        .map_err(|e| anyhow::anyhow!("reading {coordinator}/bootstrap: {e}"))?;
    let mut out = Vec::new();
    for p in b.peers {
        let Ok(id) = p.peer_id.parse::<libp2p::PeerId>() else {
            continue;
        };
        for a in p.addresses {
            let Ok(mut m) = a.parse::<Multiaddr>() else {
                continue;
            };
            if network::peer_of(&m).is_none() {
                m.push(libp2p::multiaddr::Protocol::P2p(id));
            }
            out.push(m);
        }
    }
    Ok(out)
}

/// The peers to join through: `--bootstrap` when given, else the
/// coordinator's `/bootstrap`; an error that says what to pass when there
/// is neither.
pub async fn peers_to_join(
    bootstrap: Vec<Multiaddr>,
    coordinator: Option<&str>,
) -> anyhow::Result<Vec<Multiaddr>> {
    if !bootstrap.is_empty() {
        return Ok(bootstrap);
    }
    match coordinator {
        Some(c) => bootstrap_from(c).await,
        None => anyhow::bail!(
            "no way into the mesh: pass --coordinator URL (its /bootstrap lists peers) or --bootstrap MULTIADDR (the address a worker, gateway or relay logs at start, ending in /p2p/<PeerId>)"
        ),
    }
}

pub fn print_models(rows: &[WorkerRow]) {
    if rows.is_empty() {
        println!("no models found on the mesh");
        return;
    }
    println!(
        "{:<28} {:<54} {:<15} {:>6} {:>8} {:>9} {:>8}",
        "MODEL", "WORKER", "WEIGHTS", "QUEUE", "ACTIVE", "TTFT ms", "RTT ms"
    );
    for r in rows {
        let f = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
        // The digest's first 8 hex digits: enough to pin it
        // (`model@sha256:<those>`); `--json` prints it whole.
        let weights = r.digest.as_deref().and_then(|d| d.get(..15)).unwrap_or("-");
        println!(
            "{:<28} {:<54} {:<15} {:>6} {:>8} {:>9} {:>8}",
            r.model,
            r.peer_id,
            weights,
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

/// The default status addresses of a worker and a gateway on this machine.
pub const LOCAL_NODES: [&str; 2] = ["http://127.0.0.1:9464", "http://127.0.0.1:8080"];

/// A node's `GET /troop/status`, when it answers as a Troop node.
async fn node_status(url: &str) -> Option<serde_json::Value> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .ok()?;
    let v: serde_json::Value = http
        .get(format!("{}/troop/status", url.trim_end_matches('/')))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v.get("role")?.as_str()?;
    Some(v)
}

/// What the doctor checks: the node on this machine (through its status
/// address: `nodes`, or the default worker and gateway ports), the
/// coordinator (given, or the one that node uses), and the mesh as others
/// see it (joined through `bootstrap`, or the coordinator's `/bootstrap`).
pub async fn doctor(
    bootstrap: Vec<Multiaddr>,
    relays: Vec<Multiaddr>,
    coordinator: Option<String>,
    nodes: Vec<String>,
    wait: Duration,
) -> anyhow::Result<Vec<Check>> {
    let started = Instant::now();
    let asked_nodes = !nodes.is_empty();
    let candidates: Vec<String> = if asked_nodes {
        nodes
    } else {
        LOCAL_NODES.iter().map(|s| s.to_string()).collect()
    };
    let mut local = Vec::new();
    for url in &candidates {
        if let Some(v) = node_status(url).await {
            local.push((url.clone(), v));
        }
    }
    let coordinator = coordinator.or_else(|| {
        local
            .iter()
            .find_map(|(_, v)| v["coordinator"].as_str().map(String::from))
    });
    let mut checks = Vec::new();
    let had_bootstrap = !bootstrap.is_empty();
    let bootstrap = match (had_bootstrap, &coordinator) {
        (false, Some(c)) => match bootstrap_from(c).await {
            Ok(b) => b,
            Err(e) => {
                checks.push(Check {
                    name: "peers from coordinator",
                    ok: false,
                    detail: format!("{e:#}"),
                    advice: "check --coordinator and that the coordinator runs, or pass --bootstrap",
                });
                Vec::new()
            }
        },
        _ => bootstrap,
    };
    let from_coordinator = !had_bootstrap && !bootstrap.is_empty();
    let (rows, st) = survey_with(bootstrap, relays, true, wait).await?;
    let private = st.nat == "private";
    let workers: std::collections::BTreeSet<String> =
        rows.iter().map(|r| r.peer_id.clone()).collect();
    let of_workers = |v: &[String]| -> Vec<String> {
        v.iter().filter(|p| workers.contains(*p)).cloned().collect()
    };
    let punched = of_workers(&st.hole_punched);
    let relayed = of_workers(&st.relayed_peers);
    if local.is_empty() {
        checks.push(Check {
            name: "node on this machine",
            ok: !asked_nodes,
            detail: format!(
                "none answers at {} (the checks below are of the mesh only)",
                candidates.join(" or ")
            ),
            advice: "start it, or pass --node with its --http address, e.g. --node http://127.0.0.1:9465",
        });
    }
    for (url, v) in &local {
        let role = v["role"].as_str().unwrap_or("node");
        let peer = v["peer_id"].as_str().unwrap_or("?").to_string();
        let nat = v["nat"]["status"]
            .as_str()
            .or_else(|| v["nat"].as_str())
            .unwrap_or("unknown");
        let peers = v["nat"]["connected_peers"]
            .as_u64()
            .or_else(|| v["connected_peers"].as_u64())
            .unwrap_or(0);
        checks.push(Check {
            name: "node on this machine",
            ok: true,
            detail: format!("{role} {peer} at {url}: NAT {nat}, {peers} peers connected"),
            advice: "",
        });
        if role == "worker" {
            let upstream_ok = v["upstream"]["healthy"].as_bool().unwrap_or(false);
            checks.push(Check {
                name: "its model server",
                ok: upstream_ok,
                detail: format!(
                    "{} {}",
                    v["upstream"]["url"].as_str().unwrap_or("?"),
                    match (upstream_ok, v["upstream"]["state"].as_str()) {
                        (true, _) => "lists its models".to_string(),
                        (false, Some("withdrawn")) => format!(
                            "gone past --upstream-gone-secs, adverts withdrawn until it is back: {}",
                            v["upstream"]["error"].as_str().unwrap_or("no answer")
                        ),
                        (false, Some("waiting")) => format!(
                            "waiting for upstream (tried {} times): {}",
                            v["upstream"]["tries"].as_u64().map_or("several".into(), |n| n.to_string()),
                            v["upstream"]["error"].as_str().unwrap_or("no answer")
                        ),
                        (false, _) => format!(
                            "failed: {}",
                            v["upstream"]["error"].as_str().unwrap_or("no answer")
                        ),
                    }
                ),
                advice: "start the model server the worker's --upstream names (scripts/setup-model and scripts/model_server.py run one without Ollama)",
            });
            if let Some(check) = hardware_check(&v["hardware"]) {
                checks.push(check);
            }
            let seen = rows.iter().any(|r| r.peer_id == peer);
            checks.push(Check {
                name: "its advert, seen from outside",
                ok: seen,
                detail: if seen {
                    format!("this doctor's own node received {peer}'s advert")
                } else {
                    format!("no advert from {peer} reached this doctor's node")
                },
                advice: "others cannot find this worker through the mesh: check the NAT lines above (a relay), and that --bootstrap or the coordinator's /bootstrap leads to its peers",
            });
            if let Some(c) = &coordinator {
                let client = crate::coordinator_client::CoordinatorClient::new(
                    c,
                    troop_protocol::identity::generate(),
                );
                let alive = client.worker(&peer).await.map(|w| w.map(|w| w.alive));
                checks.push(Check {
                    name: "its registration",
                    ok: matches!(alive, Ok(Some(true))),
                    detail: match alive {
                        Ok(Some(true)) => format!("{c} lists it as alive"),
                        Ok(Some(false)) => format!("{c} lists it, not alive (no heartbeat lately)"),
                        Ok(None) => format!("{c} does not list it"),
                        Err(e) => format!("{c}: {e}"),
                    },
                    advice: "the worker's log says why it cannot reach the coordinator; check its --coordinator",
                });
            }
        }
    }
    checks.extend([
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
            } else if from_coordinator {
                "the peers the coordinator's /bootstrap lists did not answer: are they reachable from here (a relay)?"
            } else {
                "pass --coordinator URL (its /bootstrap lists peers) or --bootstrap with the address a worker or gateway logs at start"
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
    ]);
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

/// `troop account`: the balance and the latest history of the key's own
/// account (the history is signed with that key).
pub async fn account(
    coordinator: &str,
    key: libp2p::identity::Keypair,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let client = crate::coordinator_client::CoordinatorClient::new(coordinator, key);
    let me = client.account_id();
    match client.identify().await {
        Ok(_) => {}
        Err(e) => anyhow::bail!(e),
    }
    let v = match client.my_transactions().await {
        Ok(v) => v,
        Err(e) if e.status() == Some(404) => {
            println!(
                "account {me}\n  not known to {coordinator} yet: it opens with its first ticket (a gateway) or registration (a worker)"
            );
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Err(e) => anyhow::bail!("reading the history of {me}: {e}"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    let b = &v["balance"];
    println!("account {me}");
    println!(
        "  available {:.3}  held {:.3}  credited {:.3}  debited {:.3} (credit-seconds)",
        f(&b["available"]),
        f(&b["pending"]),
        f(&b["credited"]),
        f(&b["debited"])
    );
    let txs = v["transactions"].as_array().cloned().unwrap_or_default();
    if txs.is_empty() {
        println!("  no transaction yet");
    } else {
        println!(
            "  {:>6}  {:<8} {:>12} {:>14}  {:<8} job",
            "id", "kind", "amount", "released", "status"
        );
    }
    for t in &txs {
        println!(
            "  {:>6}  {:<8} {:>12.3} {:>14}  {:<8} {}",
            t["id"],
            t["kind"].as_str().unwrap_or(""),
            f(&t["amount"]),
            t["released"]
                .as_f64()
                .map(|x| format!("{x:+.3}"))
                .unwrap_or_default(),
            t["status"].as_str().unwrap_or(""),
            t["job_id"].as_str().unwrap_or("-")
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The worker's proof of hardware as its status page shows it: the
/// adapters found, what proved and at what speed. None when it proves
/// nothing (`--benchmark` off and no re-proof asked).
fn hardware_check(h: &serde_json::Value) -> Option<Check> {
    let proof = &h["proof"];
    let state = proof["state"].as_str().unwrap_or("off");
    if state == "off" {
        return None;
    }
    let adapters: Vec<String> = h["adapters"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|a| {
                    format!(
                        "{} ({}, {})",
                        a["name"].as_str().unwrap_or("?"),
                        a["kind"].as_str().unwrap_or("?"),
                        a["api"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let found = if adapters.is_empty() {
        "no graphics adapter found".to_string()
    } else {
        format!("adapters found: {}", adapters.join("; "))
    };
    let used = match (proof["backend"].as_str(), proof["adapter"].as_str()) {
        (Some(b), Some(a)) => format!("{b} on {a}"),
        (Some(b), None) => b.to_string(),
        _ => h["backend_asked"].as_str().unwrap_or("auto").to_string(),
    };
    let detail = match state {
        "verified" => format!(
            "{found}; proved on {used}: {:.1} GFLOP/s verified, multiplier {}{}{}",
            proof["gflops"].as_f64().unwrap_or(0.0),
            proof["multiplier"].as_f64().unwrap_or(1.0),
            match proof["reproofs"].as_u64() {
                Some(n) if n > 0 => format!(", {n} re-proofs answered"),
                _ => String::new(),
            },
            proof["fallback"]
                .as_str()
                .map(|f| format!(" (the GPU failed, the CPU proved: {f})"))
                .unwrap_or_default()
        ),
        "running" => format!("{found}; proving on {used}"),
        _ => format!(
            "{found}; the proof failed: {}",
            proof["error"].as_str().unwrap_or("no reason given")
        ),
    };
    Some(Check {
        name: "its proof of hardware",
        ok: state != "failed",
        detail,
        advice: "the worker's log says why; `troop bench --backend auto` proves locally, and a GPU needs its Vulkan (or Metal, DX12) driver",
    })
}

#[cfg(test)]
mod tests {
    use super::hardware_check;
    use serde_json::json;

    #[test]
    fn doctor_names_the_adapters_found_and_what_proved() {
        assert!(hardware_check(&json!({"proof": {"state": "off"}})).is_none());
        let c = hardware_check(&json!({
            "backend_asked": "auto",
            "adapters": [{"name": "llvmpipe (LLVM 15.0.6, 256 bits)", "kind": "cpu", "api": "vulkan"}],
            "proof": {"state": "verified", "gflops": 180.5, "multiplier": 1.805,
                      "backend": "cpu", "adapter": null, "reproofs": 2, "fallback": null}
        }))
        .expect("a check");
        assert!(c.ok);
        for part in [
            "llvmpipe (LLVM 15.0.6, 256 bits) (cpu, vulkan)",
            "proved on cpu",
            "180.5 GFLOP/s",
            "2 re-proofs",
        ] {
            assert!(c.detail.contains(part), "{part:?} in {}", c.detail);
        }
        let c = hardware_check(&json!({
            "adapters": [],
            "proof": {"state": "failed", "error": "the coordinator refused the proof"}
        }))
        .expect("a check");
        assert!(!c.ok);
        assert!(
            c.detail.contains("no graphics adapter found"),
            "{}",
            c.detail
        );
        assert!(c.detail.contains("refused the proof"), "{}", c.detail);
    }
}
