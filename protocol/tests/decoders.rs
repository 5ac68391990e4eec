//! Random and mutated bytes fed to every decoder a peer or a stranger can
//! reach: adverts, receipts and their MACs, signed request headers,
//! tickets and acknowledgements. Each must refuse (or accept) without
//! panicking, and a mutated signed thing must never verify.

use proptest::prelude::*;
use troop_protocol::advert::{Advert, ModelAdvert};
use troop_protocol::identity::generate;
use troop_protocol::receipt::{Receipt, sign_receipt, verify_receipt_mac};
use troop_protocol::signed::{sign_request, verify_request};
use troop_protocol::ticket::TicketVerifier;

/// The body every signed request below carries.
const EMPTY: &[u8] = b"{}";

fn mutate(mut bytes: Vec<u8>, at: prop::sample::Index, byte: u8, how: u8) -> Vec<u8> {
    let i = at
        .index(bytes.len().max(1))
        .min(bytes.len().saturating_sub(1));
    match how {
        0 if !bytes.is_empty() => bytes[i] ^= byte | 1,
        1 => bytes.truncate(i),
        _ => bytes.insert(i, byte),
    }
    bytes
}

fn advert() -> Advert {
    Advert {
        peer_id: generate().public().to_peer_id().to_base58(),
        addresses: vec!["/ip4/127.0.0.1/tcp/4001".into()],
        models: vec![ModelAdvert {
            name: "m".into(),
            digest: None,
            runtime: None,
            context_length: Some(4096),
            embeds: false,
        }],
        queue_depth: 0,
        active_jobs: 1,
        max_jobs: 8,
        ttft_ms: Some(12.5),
        tokens_per_s: None,
        hardware_multiplier: 1.0,
        ttl_ms: 9000,
        sent_at_ms: 1,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn adverts(bytes in proptest::collection::vec(any::<u8>(), 0..512),
               at in any::<prop::sample::Index>(), byte in any::<u8>(), how in 0u8..3) {
        let _ = Advert::decode(&bytes);
        let _ = Advert::decode(&mutate(advert().encode(), at, byte, how));
    }

    #[test]
    fn receipts_and_their_macs(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                               at in any::<prop::sample::Index>(), byte in any::<u8>(), how in 0u8..3) {
        let _ = serde_json::from_slice::<Receipt>(&bytes);
        let body = br#"{"job_id":"j","worker":"w","user":"u","model":"m","prompt_tokens":1,"completion_tokens":2,"started_at":1,"finished_at":2,"status":"completed"}"#.to_vec();
        prop_assert!(serde_json::from_slice::<Receipt>(&body).is_ok());
        let key = [7u8; 32];
        let mac = sign_receipt(&key, 100, &body);
        let changed = mutate(body.clone(), at, byte, how);
        let _ = serde_json::from_slice::<Receipt>(&changed);
        if changed != body {
            prop_assert!(!verify_receipt_mac(&key, 100, &changed, &mac));
        }
        let _ = verify_receipt_mac(&key, 100, &body, &String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn signed_headers(peer in ".{0,80}", ts in ".{0,24}", nonce in ".{0,40}", sig in ".{0,120}",
                      at in any::<prop::sample::Index>(), byte in any::<u8>(), how in 0u8..3) {
        let _ = verify_request([Some(&peer), Some(&ts), Some(&nonce), Some(&sig)], "POST", "/x", EMPTY, 100, 300);
        let key = generate();
        let h = sign_request(&key, "POST", "/x", EMPTY, 100);
        let [p, t, n, s] = h.pairs();
        prop_assert!(verify_request([Some(p.1), Some(t.1), Some(n.1), Some(s.1)], "POST", "/x", EMPTY, 100, 300).is_ok());
        let bad = String::from_utf8_lossy(&mutate(s.1.as_bytes().to_vec(), at, byte, how)).into_owned();
        if bad != s.1 {
            prop_assert!(verify_request([Some(p.1), Some(t.1), Some(n.1), Some(&bad)], "POST", "/x", EMPTY, 100, 300).is_err());
        }
        let body = mutate(EMPTY.to_vec(), at, byte, how);
        if body.as_slice() != EMPTY {
            prop_assert!(verify_request([Some(p.1), Some(t.1), Some(n.1), Some(s.1)], "POST", "/x", &body, 100, 300).is_err());
        }
    }

    #[test]
    fn tickets(token in "[A-Za-z0-9_.=-]{0,400}", raw in proptest::collection::vec(any::<u8>(), 0..300)) {
        let v = TicketVerifier::new("12D3KooWworker");
        prop_assert!(v.check(&token, 100).is_err());
        prop_assert!(v.check(&String::from_utf8_lossy(&raw), 100).is_err());
    }

    #[test]
    fn acknowledgements(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = serde_json::from_slice::<troop_protocol::usage::Ack>(&bytes);
        let _ = serde_json::from_slice::<troop_protocol::usage::RequestLine>(&bytes);
    }
}
