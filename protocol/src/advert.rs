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
    #[serde(default)]
    pub digest: Option<String>,
    #[serde(default)]
    pub context_length: Option<u32>,
    /// The upstream serves `/v1/embeddings` for this model (absent in
    /// older adverts: read it as false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub embeds: bool,
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
                models: vec![ModelAdvert { name, digest: Some("sha256:ab".into()), context_length: Some(8192), embeds: q % 2 == 0 }],
                queue_depth: q, active_jobs: 1, max_jobs: 8, ttft_ms: ttft, tokens_per_s: None,
                hardware_multiplier: 1.0, ttl_ms: ttl, sent_at_ms: 5,
            };
            prop_assert_eq!(Advert::decode(&a.encode()), Some(a));
        }
    }
}
