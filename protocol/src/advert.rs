//! What workers announce on the mesh: a Kademlia provider record per model
//! and a signed gossipsub advert repeated every few seconds.

use serde::{Deserialize, Serialize};

/// The gossipsub topic that carries adverts.
pub const ADVERT_TOPIC: &str = "/troop/adverts/1";
/// The Kademlia protocol name (a private DHT, not the IPFS one).
pub const KAD_PROTOCOL: &str = "/troop/kad/1.0.0";

/// The Kademlia key under which workers of `model` provide.
pub fn model_key(model: &str) -> Vec<u8> {
    format!("/troop/model/{model}").into_bytes()
}

/// One model a worker serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelAdvert {
    pub name: String,
    /// The exact weights: `sha256:<64 hex>` of the GGUF file (Ollama's
    /// blob digest; for llama.cpp the file its `/props` names, or the one
    /// given with `troop worker --model-file`). A claim, like the rest of
    /// the advert: audits are what make it true. None when unknown.
    #[serde(default)]
    pub digest: Option<String>,
    /// The runtime serving it and its version (`llama.cpp b6000`,
    /// `ollama 0.12.3`), when the upstream says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    #[serde(default)]
    pub context_length: Option<u32>,
    /// The upstream serves `/v1/embeddings` for this model (absent in
    /// older adverts: read it as false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub embeds: bool,
}

/// Splits a model a user asked for into its name and the digest it is
/// pinned to: `smollm2-135m@sha256:1a2b3c4d` asks for workers whose
/// weights' digest starts with `sha256:1a2b3c4d` (at least 8 hex digits).
/// Anything else is a plain name (an `@` not followed by such a digest
/// stays part of it).
pub fn split_pin(model: &str) -> (&str, Option<&str>) {
    if let Some((name, pin)) = model.rsplit_once('@')
        && let Some(hex) = pin.strip_prefix("sha256:")
        && hex.len() >= 8
        && hex.len() <= 64
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && !name.is_empty()
    {
        return (name, Some(pin));
    }
    (model, None)
}

/// Whether a worker's `digest` is the one `pin` names (a prefix of it,
/// hex digits compared without regard to case).
pub fn digest_matches(digest: Option<&str>, pin: &str) -> bool {
    digest.is_some_and(|d| {
        d.len() >= pin.len() && d.as_bytes()[..pin.len()].eq_ignore_ascii_case(pin.as_bytes())
    })
}

/// A worker's advert (CBOR on the gossipsub topic; gossipsub signs it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Advert {
    pub peer_id: String,
    pub addresses: Vec<String>,
    pub models: Vec<ModelAdvert>,
    pub queue_depth: u32,
    pub active_jobs: u32,
    pub max_jobs: u32,
    /// Recent time to first token (EWMA), milliseconds; None before the first job.
    pub ttft_ms: Option<f64>,
    /// Recent tokens per second (EWMA).
    pub tokens_per_s: Option<f64>,
    pub hardware_multiplier: f64,
    /// How long this advert stays valid.
    pub ttl_ms: u64,
    pub sent_at_ms: u64,
}

impl Advert {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Serializing plain data into a Vec cannot fail.
        let _ = ciborium::into_writer(self, &mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Advert> {
        if bytes.len() > 64 * 1024 {
            return None;
        }
        ciborium::from_reader(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn adverts_round_trip(name in ".{1,30}", q in any::<u32>(), ttft in proptest::option::of(0.0f64..1e6), ttl in any::<u64>()) {
            let a = Advert {
                peer_id: "12D3KooW".into(),
                addresses: vec!["/ip4/127.0.0.1/tcp/1".into()],
                models: vec![ModelAdvert { name, digest: Some("sha256:ab".into()), runtime: Some("llama.cpp b1".into()), context_length: Some(8192), embeds: q % 2 == 0 }],
                queue_depth: q, active_jobs: 1, max_jobs: 8, ttft_ms: ttft, tokens_per_s: None,
                hardware_multiplier: 1.0, ttl_ms: ttl, sent_at_ms: 5,
            };
            prop_assert_eq!(Advert::decode(&a.encode()), Some(a));
        }
    }

    #[test]
    fn a_pin_names_a_digest_prefix_and_anything_else_is_a_name() {
        assert_eq!(
            split_pin("smollm2-135m@sha256:1A2b3c4d"),
            ("smollm2-135m", Some("sha256:1A2b3c4d"))
        );
        for plain in [
            "llama3:8b",
            "org/model@main",
            "m@sha256:123",
            "@sha256:12345678",
            "m@sha256:xyz12345",
        ] {
            assert_eq!(split_pin(plain), (plain, None), "{plain}");
        }
        let d = format!("sha256:{}", "ab".repeat(32));
        assert!(digest_matches(Some(&d), "sha256:ABABAB"));
        assert!(digest_matches(Some(&d), &d));
        assert!(!digest_matches(Some(&d), "sha256:abac"));
        assert!(!digest_matches(None, "sha256:abab"));
    }
}
