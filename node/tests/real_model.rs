//! The real thing: SmolLM2-135M-Instruct served by llama.cpp (the
//! `xllamacpp` wheel), a worker in front of it, a gateway, and real clients: the
//! official `openai` Python client streaming a completion through the mesh,
//! then the same requests straight to llama.cpp and through the gateway
//! side by side (`scripts/openai_compat_check.py`: sync, async, stream,
//! structured output, logprobs, stop, seed, n, context overflow,
//! langchain-openai, litellm), with a fake tool-calling model on the same
//! mesh for the tool checks.
//!
//! Needs `TROOP_PYTHON`: the python of the virtual environment that
//! `scripts/setup-model` makes (`scripts/test` sets it).

mod common;

use std::process::{Command, Stdio};

use common::{Dialect, FakeUpstream, KillOnDrop, MODEL, TestNet, eventually, free_port, tokens};

/// The python of the model venv (`TROOP_PYTHON`).
fn venv_python() -> String {
    std::env::var("TROOP_PYTHON").expect(
        "TROOP_PYTHON must name the python of the model venv: run scripts/test, or `export TROOP_PYTHON=$(scripts/setup-model | tail -1)`",
    )
}

fn scripts_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

/// Starts `scripts/model_server.py` with `args` (one thread, a free port)
/// and waits until it has loaded its model; returns it and its URL.
async fn model_server(http: &reqwest::Client, args: &[&str]) -> (KillOnDrop, String) {
    let port = free_port();
    let server = KillOnDrop(
        Command::new(venv_python())
            .arg(scripts_dir().join("model_server.py"))
            .args(args)
            .args(["--port", &port.to_string(), "--threads", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a model server"),
    );
    let upstream = format!("http://127.0.0.1:{port}");
    eventually("a model server to load", 180, || {
        let http = http.clone();
        let url = format!("{upstream}/health");
        async move { (http.get(&url).send().await.ok()?.status() == 200).then_some(()) }
    })
    .await;
    (server, upstream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_streams_a_real_completion_through_the_mesh() {
    let python = venv_python();
    let scripts = scripts_dir();
    let http = reqwest::Client::new();
    let (_server, upstream) = model_server(&http, &["--model", "smollm2"]).await;

    let mut net = TestNet::start(|_| {}).await;
    let w = net.add_worker(&upstream, |_| {}).await;
    assert_eq!(net.workers[w].models(), vec!["smollm2-135m".to_string()]);
    net.add_gateway().await;
    let gw = net.gateway_url();
    eventually("the gateway to list the model", 30, || {
        let http = http.clone();
        let url = format!("{gw}/v1/models");
        async move {
            let v: serde_json::Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            v["data"]
                .as_array()?
                .iter()
                .any(|m| m["id"] == "smollm2-135m")
                .then_some(())
        }
    })
    .await;

    // The advert names the weights: the SHA-256 of the GGUF file that
    // llama.cpp's /props says it loaded, computed here from the file.
    let props: serde_json::Value = http
        .get(format!("{upstream}/props"))
        .send()
        .await
        .expect("GET /props")
        .json()
        .await
        .expect("/props is JSON");
    let gguf = props["model_path"]
        .as_str()
        .expect("/props names the model file");
    let want = {
        use sha2::Digest as _;
        let bytes = std::fs::read(gguf).expect("read the GGUF file");
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)))
    };
    let rows = net.workers[w].model_adverts();
    assert_eq!(
        rows.first().and_then(|m| m.digest.clone()),
        Some(want.clone())
    );
    assert!(
        rows.first()
            .and_then(|m| m.runtime.as_deref())
            .is_some_and(|r| r.starts_with("llama.cpp ")),
        "{rows:?}"
    );
    eventually("the gateway to show the model's digest", 30, || {
        let http = http.clone();
        let url = format!("{gw}/v1/models");
        let want = want.clone();
        async move {
            let v: serde_json::Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            let m = v["data"]
                .as_array()?
                .iter()
                .find(|m| m["id"] == "smollm2-135m")?;
            (m["digests"][0]["digest"] == want.as_str()).then_some(())
        }
    })
    .await;

    let gw_v1 = format!("{gw}/v1");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(scripts.join("openai_stream_check.py"))
            .args([&format!("{gw}/v1"), "smollm2-135m", "Name three colors."])
            .output()
    })
    .await
    .expect("join")
    .expect("run the openai client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("chunks, finish_reason="), "{stdout}");
    // An instruction-tuned model answers the question: a list of colours.
    let answer = stdout.to_lowercase();
    assert!(
        [
            "red", "blue", "green", "yellow", "black", "white", "orange", "purple"
        ]
        .iter()
        .any(|c| answer.contains(c)),
        "no colour in the answer: {stdout}"
    );

    // Every streamed chat answer carries the worker's signed evidence
    // (each token's id, logprob and top 5), verified and checked by the
    // gateway; the app that did not ask for logprobs gets none.
    let state = net.gateway.as_ref().expect("gateway").state.clone();
    let verified = |s: &troop_node::gateway::GatewayState| {
        s.evidence_stats
            .verified
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let before = verified(&state);
    let chat_url = format!("{gw_v1}/chat/completions");
    let chat = |extra: serde_json::Value| {
        let http = http.clone();
        let url = chat_url.clone();
        async move {
            let mut body = serde_json::json!({"model": "smollm2-135m", "stream": true, "max_tokens": 12,
                "temperature": 0, "messages": [{"role": "user", "content": "Name a colour."}]});
            for (k, v) in extra.as_object().cloned().unwrap_or_default() {
                body[k] = v;
            }
            let r = http.post(&url).json(&body).send().await.expect("send");
            assert_eq!(r.status().as_u16(), 200);
            r.text().await.expect("body")
        }
    };
    let plain = chat(serde_json::json!({})).await;
    assert!(
        plain.contains("[DONE]") && !plain.contains("logprobs"),
        "{plain}"
    );
    eventually("the answer's evidence", 10, || {
        let state = state.clone();
        async move { (verified(&state) > before).then_some(()) }
    })
    .await;
    {
        let kept = state.evidence.lock().expect("evidence");
        let last = kept.back().expect("kept evidence");
        assert!(!last.evidence.tokens.is_empty());
        assert!(last.evidence.tokens.iter().all(|t| !t.top.is_empty()));
        assert!(
            last.violations.is_empty(),
            "honest greedy evidence was found inconsistent: {:?}",
            last.violations
        );
        assert_eq!(
            last.evidence
                .verify(&net.workers[w].peer_id, &last.job_id, last.index),
            Ok(())
        );
    }
    assert_eq!(
        state
            .evidence_stats
            .refused
            .load(std::sync::atomic::Ordering::SeqCst)
            + state
                .evidence_stats
                .inconsistent
                .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    // The app asked for logprobs: it gets them as the model server sent them.
    let asked = chat(serde_json::json!({"logprobs": true, "top_logprobs": 2})).await;
    assert!(asked.contains("\"top_logprobs\""), "{asked}");
    // The completions endpoint carries evidence too (`logprobs` is a count
    // there), taken out of what the app gets.
    let before = verified(&state);
    let r = http
        .post(format!("{gw_v1}/completions"))
        .json(
            &serde_json::json!({"model": "smollm2-135m", "stream": true, "max_tokens": 8,
            "temperature": 0, "prompt": "The sky is"}),
        )
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.expect("body");
    assert!(
        text.contains("[DONE]") && !text.contains("logprobs"),
        "{text}"
    );
    eventually("the completion's evidence", 10, || {
        let state = state.clone();
        async move { (verified(&state) > before).then_some(()) }
    })
    .await;
    {
        let kept = state.evidence.lock().expect("evidence");
        let last = kept.back().expect("kept evidence");
        assert!(!last.evidence.tokens.is_empty() && last.violations.is_empty());
    }
    // A whole (not streamed) answer carries it as well.
    let before = verified(&state);
    let whole: serde_json::Value = http
        .post(&chat_url)
        .json(
            &serde_json::json!({"model": "smollm2-135m", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Name a colour."}]}),
        )
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("a whole answer");
    assert!(
        whole["choices"][0]["message"]["content"].is_string()
            && whole["choices"][0].get("logprobs").is_none(),
        "{whole}"
    );
    eventually("the whole answer's evidence", 10, || {
        let state = state.clone();
        async move { (verified(&state) > before).then_some(()) }
    })
    .await;

    // Side by side with real clients; tools on a model that calls them.
    let tools = FakeUpstream::start(Dialect::OpenAi, tokens(3), std::time::Duration::ZERO).await;
    net.add_worker(&tools.url, |_| {}).await;
    net.wait_for_workers(1).await;
    let (python2, scripts2) = (venv_python(), scripts_dir());
    let direct = format!("{upstream}/v1");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python2)
            .arg(scripts2.join("openai_compat_check.py"))
            .args([&direct, &gw_v1, "smollm2-135m", MODEL])
            .output()
    })
    .await
    .expect("join")
    .expect("run the compatibility check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("[all passed]"),
        "side-by-side checks failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count() >= 11,
        "{stdout}"
    );

    // The job was paid for.
    let worker = net.workers[w].peer_id.to_base58();
    eventually("the settlement", 30, || {
        let net = &net;
        let worker = worker.clone();
        async move { (net.balance(&worker).await?["available"].as_f64()? > 0.0).then_some(()) }
    })
    .await;
}

/// Issue 25's audit on real model servers: two honest workers serve
/// SmolLM2-135M; a third advertises the same name and digest (its
/// `--model-file` is SmolLM2's GGUF) while its server runs Gemma 3 270M.
/// Within 40 chat requests the cheater is caught (an audit failed and a
/// second auditor confirmed it) and gets no more requests; the honest
/// workers pass their audits; every request is answered throughout.
/// A model server that refuses every request with a `grammar` (503, as
/// when busy: an auditor that stops answering audits) and passes
/// everything else to `upstream` unchanged.
async fn refuses_audits(upstream: String) -> String {
    use axum::body::{Body, Bytes};
    use axum::http::{Method, Uri};
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
        let (http, upstream) = (http.clone(), upstream.clone());
        async move {
            if String::from_utf8_lossy(&body).contains("\"grammar\"") {
                return axum::http::Response::builder()
                    .status(503)
                    .body(Body::from(r#"{"error":{"code":503,"message":"busy"}}"#))
                    .unwrap_or_default();
            }
            let r = http
                .request(method, format!("{upstream}{uri}"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            match r {
                Ok(r) => axum::http::Response::builder()
                    .status(r.status().as_u16())
                    .header(
                        "content-type",
                        r.headers()
                            .get("content-type")
                            .cloned()
                            .unwrap_or(axum::http::HeaderValue::from_static("application/json")),
                    )
                    .body(Body::from_stream(r.bytes_stream()))
                    .unwrap_or_default(),
                Err(_) => axum::http::Response::builder()
                    .status(502)
                    .body(Body::empty())
                    .unwrap_or_default(),
            }
        }
    });
    common::serve_app(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serving_other_weights_under_the_same_digest_is_caught_by_audits() {
    let http = reqwest::Client::new();
    // Loading one after another: three loads at once on two cores are no
    // faster.
    let (_a, up_a) = model_server(&http, &["--model", "smollm2"]).await;
    let (_b, up_b) = model_server(&http, &["--model", "smollm2"]).await;
    let (_c, up_c) = model_server(&http, &["--model", "gemma", "--alias", "smollm2-135m"]).await;
    let props: serde_json::Value = http
        .get(format!("{up_a}/props"))
        .send()
        .await
        .expect("props")
        .json()
        .await
        .expect("props json");
    let gguf = std::path::PathBuf::from(props["model_path"].as_str().expect("model_path"));
    // The second cheater answers canned text with made-up evidence (token
    // ids and logprobs in llama.cpp's shape) under the same name and file.
    let canned = FakeUpstream::start_on(
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind"),
        "smollm2-135m",
        Dialect::OpenAi,
        tokens(10),
        std::time::Duration::ZERO,
    );
    canned
        .state
        .token_ids
        .store(true, std::sync::atomic::Ordering::SeqCst);
    if let Ok(mut p) = canned.state.model_path.lock() {
        *p = Some(gguf.display().to_string());
    }

    // One confirmed failure suspends (this gateway stops sending the
    // cheater requests after its first, so a second may never come).
    let mut net = TestNet::start(|c| {
        c.suspend_after_failures = 1;
        // Every audit buys a ticket of its own: more than the default 20 an hour.
        c.authorize_per_hour = 10_000;
    })
    .await;
    let a = net.add_worker(&up_a, |_| {}).await;
    let b = net.add_worker(&up_b, |_| {}).await;
    let c = net
        .add_worker(&up_c, move |cfg| cfg.model_file = Some(gguf.clone()))
        .await;
    let d = net.add_worker(&canned.url, |_| {}).await;
    // An honest worker (SmolLM2 behind it) that never answers an audit.
    let staller = refuses_audits(up_a.clone()).await;
    let e = net.add_worker(&staller, |_| {}).await;
    net.add_gateway().await;
    let pe = net.workers[e].peer_id;
    let (pa, pb, pc, pd) = (
        net.workers[a].peer_id,
        net.workers[b].peer_id,
        net.workers[c].peer_id,
        net.workers[d].peer_id,
    );
    println!("honest {pa} and {pb}, cheaters {pc} (other weights) and {pd} (canned)");
    let state = net.gateway.as_ref().expect("gateway").state.clone();
    // The three advertise one digest: to the router they are one model.
    eventually("five workers of one digest", 60, || {
        let state = state.clone();
        async move {
            let t = state.table.read().ok()?;
            let digest = t.peer_digest(&pa, "smollm2-135m")?;
            (t.candidates_for("smollm2-135m", false, Some(&digest)).len() == 5).then_some(())
        }
    })
    .await;

    let url = format!("{}/v1/chat/completions", net.gateway_url());
    let chat = |i: usize| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let body = serde_json::json!({"model": "smollm2-135m", "stream": true, "max_tokens": 10,
                "messages": [{"role": "user", "content": format!("Name a colour and the number {i}.")}]});
            let r = http.post(&url).json(&body).send().await.expect("send");
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            assert_eq!(status, 200, "{text}");
            assert!(text.contains("[DONE]"), "{text}");
        }
    };
    let mut sent = 0;
    let caught = |p: &libp2p::PeerId| state.audit_record(p).failed >= 1;
    // Bursts of eight spread over the four workers (by free slots).
    // (Issue 25 asks for one cheater caught within 40 requests; with two
    // cheaters and a staller in the mix, and audits running behind the
    // answers, up to 80 are sent while either is at large.)
    while sent < 80 && !(caught(&pc) && caught(&pd)) {
        futures::future::join_all((sent..sent + 8).map(chat)).await;
        sent += 8;
    }
    eventually("both cheaters' failed audits confirmed", 240, || {
        let state = state.clone();
        async move {
            (state.audit_record(&pc).failed >= 1 && state.audit_record(&pd).failed >= 1)
                .then_some(())
        }
    })
    .await;
    // They are no longer candidates; requests keep being answered.
    let left = state.candidates("smollm2-135m", false, None).await;
    assert!(
        !left.contains(&pc) && !left.contains(&pd) && left.len() == 3,
        "{left:?}"
    );
    futures::future::join_all((100..106).map(chat)).await;
    // Honest answers are audited too once the cheaters' audits no longer
    // fill the gateway's audit slots (a request each try until one passed).
    let mut more = 200;
    eventually("an honest answer audited and passed", 180, || {
        more += 1;
        let (state, chat) = (state.clone(), chat(more));
        async move {
            chat.await;
            let passed: u64 = [pa, pb, pe]
                .iter()
                .map(|p| state.audit_record(p).passed)
                .sum();
            (passed >= 1).then_some(())
        }
    })
    .await;
    let (ra, rb, re) = (
        state.audit_record(&pa),
        state.audit_record(&pb),
        state.audit_record(&pe),
    );
    println!(
        "after {sent} requests: honest {ra:?} {rb:?}, staller {re:?}, cheaters {:?} {:?}",
        state.audit_record(&pc),
        state.audit_record(&pd)
    );
    // The worker that stops answering audits gave no verdicts (counted),
    // others were asked instead, and its own honest answers never failed.
    assert!(re.declined >= 1 && re.failed == 0, "{re:?}");
    assert_eq!(
        (ra.failed, rb.failed),
        (0, 0),
        "an honest worker failed: {ra:?} {rb:?}"
    );
    // Every answer's evidence was the worker's and consistent (the free
    // checks pass honest numbers, and the cheater's own).
    let stats = &state.evidence_stats;
    assert_eq!(
        (
            stats.refused.load(std::sync::atomic::Ordering::SeqCst),
            stats.inconsistent.load(std::sync::atomic::Ordering::SeqCst)
        ),
        (0, 0)
    );

    // The coordinator checked the gateway's reports itself: the cheater is
    // suspended with its failure on record, its audited session refunded
    // to the user, and no ticket is sold for it any more; the honest
    // workers' passes are on their records.
    let cheaters = [pc.to_base58(), pd.to_base58()];
    let listed = eventually(
        "the cheaters suspended and honest passes published",
        60,
        || {
            let state = state.clone();
            let cheaters = cheaters.clone();
            async move {
                let w = state.client.workers().await.ok()?;
                let suspended = w
                    .workers
                    .iter()
                    .filter(|i| cheaters.contains(&i.peer_id) && i.suspended)
                    .count();
                let honest_passes: u64 = w
                    .workers
                    .iter()
                    .filter(|i| !cheaters.contains(&i.peer_id))
                    .map(|i| i.audits.passed)
                    .sum();
                (suspended == 2 && honest_passes >= 1).then_some(w)
            }
        },
    )
    .await;
    for i in &listed.workers {
        println!(
            "{}: audits {:?}, suspended {}",
            i.peer_id, i.audits, i.suspended
        );
        if cheaters.contains(&i.peer_id) {
            assert!(i.audits.failed >= 1, "{i:?}");
        } else {
            assert!(!i.suspended && i.audits.failed == 0, "{i:?}");
        }
    }
    assert!(
        listed
            .workers
            .iter()
            .filter(|i| !cheaters.contains(&i.peer_id))
            .map(|i| i.audits.passed)
            .sum::<u64>()
            >= 1
    );
    let history = state.client.my_transactions().await.expect("history");
    let refunds: Vec<&serde_json::Value> = history["transactions"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter(|e| {
                    e["kind"] == "refund"
                        && (e["credit_account"] == pc.to_base58()
                            || e["debit_account"] == pc.to_base58())
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !refunds.is_empty() && refunds.iter().all(|e| e["amount"].as_f64() > Some(0.0)),
        "no refund of the cheater's session: {history}"
    );
    let refused = state
        .client
        .authorize("smollm2-135m", &pc.to_base58(), None)
        .await;
    assert!(
        matches!(&refused, Err(troop_node::coordinator_client::ClientError::Refused { message, .. }) if message.contains("suspended")),
        "{refused:?}"
    );
}
