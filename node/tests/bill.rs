//! The bill through the real mesh: a ticket is a session (a user chats all
//! day within the coordinator's 20 tickets an hour), and a user who leaves
//! mid-answer pays for the part that arrived, acknowledged with its key.

mod common;

use std::time::Duration;

use common::{Dialect, FakeUpstream, MODEL, TestNet, eventually, tokens};
use futures::StreamExt;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_chat_requests_in_a_row_are_answered_under_the_default_limits() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::ZERO).await;
    // The seed's limit: 20 authorizations an hour per user.
    let mut net = TestNet::start(|c| c.authorize_per_hour = 20).await;
    net.add_worker(&fake.url, |c| c.session_idle = Duration::from_secs(30))
        .await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    for i in 0..30 {
        let r = net.chat(false).await;
        assert_eq!(r.status(), 200, "request {i}: {:?}", r.text().await);
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["choices"][0]["message"]["content"], tokens(4).concat());
    }
    // One session held them all: a single ticket's reservation.
    let user = net.gateway_peer();
    let b = net.balance(&user).await.expect("balance");
    assert_eq!(b["pending"], 300.0, "one open session: {b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_leaves_mid_answer_pays_for_what_arrived() {
    // 200 tokens 20 ms apart when the prompt says [slow]: 4 s in all.
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(200), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    let w = net.add_worker(&fake.url, |_| {}).await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let worker = net.workers[w].peer_id.to_base58();
    let resp = net
        .http
        .post(format!("{}/v1/chat/completions", net.gateway_url()))
        .json(&json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "[slow] a long story"}],
            "stream": true,
        }))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut seen = 0;
    while seen < 5 {
        let piece = body.next().await.expect("more").expect("bytes");
        seen += String::from_utf8_lossy(&piece).matches("data: ").count();
    }
    // The user leaves after a few chunks.
    drop(body);
    let rep = eventually("the session's settlement", 30, || {
        let net = &net;
        let worker = worker.clone();
        async move {
            let rep = net.reputation(&worker).await?;
            (rep["requests"].as_u64()? >= 1).then_some(rep)
        }
    })
    .await;
    assert_eq!(
        rep["acknowledged_share"], 1.0,
        "the gateway acknowledged on close"
    );
    assert_eq!(rep["disputed_share"], 0.0, "a user who left is no dispute");
    let earned = net.balance(&worker).await.expect("balance")["available"]
        .as_f64()
        .expect("number");
    assert!(
        earned > 0.0 && earned < 1.0,
        "paid {earned} credit-seconds for a few chunks of a 4 s answer"
    );
    assert!(fake.state.dropped.load(std::sync::atomic::Ordering::SeqCst) >= 1);
}

/// A busy session is paid: the worker closes a session at its bound of
/// requests (1,000 by default; 3 here) and files its receipt at once, the
/// gateway opens another, and every request is billed, acknowledged,
/// without waiting for the session to go idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_session_is_closed_and_billed_and_the_next_request_opens_another() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(2), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    let w = net
        .add_worker(&fake.url, |c| {
            c.max_session_requests = 3;
            c.session_idle = Duration::from_secs(120);
        })
        .await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let worker = net.workers[w].peer_id.to_base58();
    for i in 0..7 {
        let r = net.chat(false).await;
        assert_eq!(r.status(), 200, "request {i}: {:?}", r.text().await);
    }
    // Two full sessions settle (six requests); the seventh's is still open.
    let rep = eventually("the two full sessions to settle", 30, || {
        let net = &net;
        let worker = worker.clone();
        async move {
            let rep = net.reputation(&worker).await?;
            (rep["requests"].as_u64()? >= 6).then_some(rep)
        }
    })
    .await;
    assert_eq!(rep["requests"], 6, "{rep}");
    assert_eq!(rep["acknowledged_share"], 1.0, "{rep}");
    assert_eq!(rep["unacknowledged_share"], 0.0, "{rep}");
}
