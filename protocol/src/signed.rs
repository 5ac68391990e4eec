//! Signed requests to the coordinator.
//!
//! A request that spends or claims credits carries five headers:
//!
//! | header | value |
//! |---|---|
//! | `x-troop-peer` | the signer's `PeerId` (base58); its ed25519 key is inside it |
//! | `x-troop-timestamp` | unix seconds when it was signed |
//! | `x-troop-nonce` | 16 random bytes, hex |
//! | `x-troop-signature` | ed25519 signature, base64 (standard, padded) |
//!
//! What is signed is the UTF-8 text
//! `troop-request-v1\n{METHOD}\n{PATH}\n{hex sha256(body)}\n{timestamp}\n{nonce}`,
//! where PATH is the request path with its query string. The coordinator
//! refuses a timestamp more than the allowed skew (300 s) away from its own
//! clock and a nonce it has already seen from the same peer within that
//! window, so a signed request can't be replayed.

use base64::Engine;
use libp2p_identity::{Keypair, PeerId};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::ErrorCode;
use crate::identity::{parse_account_id, public_key_of};

pub const HEADER_PEER: &str = "x-troop-peer";
pub const HEADER_TIMESTAMP: &str = "x-troop-timestamp";
pub const HEADER_NONCE: &str = "x-troop-nonce";
pub const HEADER_SIGNATURE: &str = "x-troop-signature";

/// How far a signed timestamp may be from the verifier's clock.
pub const DEFAULT_MAX_SKEW_SECS: u64 = 300;

/// The headers that carry a signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    pub peer: String,
    pub timestamp: String,
    pub nonce: String,
    pub signature: String,
}

impl SignedHeaders {
    /// The headers as (name, value) pairs, ready to add to a request.
    pub fn pairs(&self) -> [(&'static str, &str); 4] {
        [
            (HEADER_PEER, &self.peer),
            (HEADER_TIMESTAMP, &self.timestamp),
            (HEADER_NONCE, &self.nonce),
            (HEADER_SIGNATURE, &self.signature),
        ]
    }
}

/// Why a signed request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("malformed header {0}: {1}")]
    Malformed(&'static str, String),
    #[error("signature does not verify")]
    BadSignature,
    #[error(
        "timestamp {timestamp} is {skew} s away from the server's clock (at most {max} s allowed)"
    )]
    StaleTimestamp { timestamp: u64, skew: u64, max: u64 },
    #[error("nonce already used")]
    Replay,
}

impl SignError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SignError::MissingHeader(_) | SignError::Malformed(..) => ErrorCode::Unauthorized,
            SignError::BadSignature => ErrorCode::BadSignature,
            SignError::StaleTimestamp { .. } => ErrorCode::StaleTimestamp,
            SignError::Replay => ErrorCode::Replay,
        }
    }
}

/// The exact bytes that are signed.
pub fn canonical_message(
    method: &str,
    path_and_query: &str,
    body: &[u8],
    timestamp: u64,
    nonce: &str,
) -> Vec<u8> {
    let body_hash = hex::encode(Sha256::digest(body));
    format!(
        "troop-request-v1\n{}\n{}\n{}\n{}\n{}",
        method.to_ascii_uppercase(),
        path_and_query,
        body_hash,
        timestamp,
        nonce
    )
    .into_bytes()
}

/// Signs a request with a fresh random nonce.
pub fn sign_request(
    key: &Keypair,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    timestamp: u64,
) -> SignedHeaders {
    let mut nonce = [0u8; 16];
    rand::rng().fill_bytes(&mut nonce);
    sign_request_with_nonce(
        key,
        method,
        path_and_query,
        body,
        timestamp,
        &hex::encode(nonce),
    )
}

/// Signs a request with the given nonce (tests use this to replay one).
pub fn sign_request_with_nonce(
    key: &Keypair,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    timestamp: u64,
    nonce: &str,
) -> SignedHeaders {
    let msg = canonical_message(method, path_and_query, body, timestamp, nonce);
    // Signing with an ed25519 key cannot fail; other key types are never made here.
    let signature = key.sign(&msg).unwrap_or_default();
    SignedHeaders {
        peer: key.public().to_peer_id().to_base58(),
        timestamp: timestamp.to_string(),
        nonce: nonce.to_string(),
        signature: base64::engine::general_purpose::STANDARD.encode(signature),
    }
}

/// A verified signature: who signed, when, and with which nonce. The caller
/// still has to check the nonce for replays (it owns the nonce store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub peer: PeerId,
    pub timestamp: u64,
    pub nonce: String,
}

/// Verifies the signature and the timestamp of a request. Header values are
/// passed raw (`None` when absent).
pub fn verify_request(
    headers: [Option<&str>; 4],
    method: &str,
    path_and_query: &str,
    body: &[u8],
    now: u64,
    max_skew: u64,
) -> Result<Verified, SignError> {
    let [peer, timestamp, nonce, signature] = headers;
    let peer = peer.ok_or(SignError::MissingHeader(HEADER_PEER))?;
    let timestamp = timestamp.ok_or(SignError::MissingHeader(HEADER_TIMESTAMP))?;
    let nonce = nonce.ok_or(SignError::MissingHeader(HEADER_NONCE))?;
    let signature = signature.ok_or(SignError::MissingHeader(HEADER_SIGNATURE))?;

    let peer_id =
        parse_account_id(peer).map_err(|e| SignError::Malformed(HEADER_PEER, e.to_string()))?;
    let public = public_key_of(&peer_id)
        .ok_or_else(|| SignError::Malformed(HEADER_PEER, "no ed25519 key inside".into()))?;
    let ts: u64 = timestamp
        .parse()
        .map_err(|_| SignError::Malformed(HEADER_TIMESTAMP, "not unix seconds".into()))?;
    if nonce.len() < 16 || nonce.len() > 64 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SignError::Malformed(
            HEADER_NONCE,
            "16 to 64 hex digits expected".into(),
        ));
    }
    let sig = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|e| SignError::Malformed(HEADER_SIGNATURE, e.to_string()))?;
    let msg = canonical_message(method, path_and_query, body, ts, nonce);
    if !public.verify(&msg, &sig) {
        return Err(SignError::BadSignature);
    }
    let skew = now.abs_diff(ts);
    if skew > max_skew {
        return Err(SignError::StaleTimestamp {
            timestamp: ts,
            skew,
            max: max_skew,
        });
    }
    Ok(Verified {
        peer: peer_id,
        timestamp: ts,
        nonce: nonce.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::generate;

    fn headers(h: &SignedHeaders) -> [Option<&str>; 4] {
        [
            Some(h.peer.as_str()),
            Some(h.timestamp.as_str()),
            Some(h.nonce.as_str()),
            Some(h.signature.as_str()),
        ]
    }

    #[test]
    fn signed_request_verifies_and_tampering_fails() {
        let key = generate();
        let body = br#"{"model":"m"}"#;
        let h = sign_request(&key, "POST", "/authorize", body, 1000);
        let v = verify_request(headers(&h), "POST", "/authorize", body, 1010, 300).expect("ok");
        assert_eq!(v.peer, key.public().to_peer_id());
        assert_eq!(v.timestamp, 1000);

        assert_eq!(
            verify_request(headers(&h), "POST", "/authorize", b"{}", 1010, 300),
            Err(SignError::BadSignature)
        );
        assert_eq!(
            verify_request(headers(&h), "POST", "/workers/register", body, 1010, 300),
            Err(SignError::BadSignature)
        );
        assert!(matches!(
            verify_request(headers(&h), "POST", "/authorize", body, 2000, 300),
            Err(SignError::StaleTimestamp { .. })
        ));
        let mut other = h.clone();
        other.peer = generate().public().to_peer_id().to_base58();
        assert_eq!(
            verify_request(headers(&other), "POST", "/authorize", body, 1010, 300),
            Err(SignError::BadSignature)
        );
        let mut missing = headers(&h);
        missing[3] = None;
        assert_eq!(
            verify_request(missing, "POST", "/authorize", body, 1010, 300),
            Err(SignError::MissingHeader(HEADER_SIGNATURE))
        );
    }

    proptest::proptest! {
        #[test]
        fn any_body_round_trips(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512), ts in 0u64..1u64<<40) {
            let key = generate();
            let h = sign_request(&key, "POST", "/x?y=1", &body, ts);
            proptest::prop_assert!(verify_request(headers(&h), "POST", "/x?y=1", &body, ts, 0).is_ok());
        }
    }
}
