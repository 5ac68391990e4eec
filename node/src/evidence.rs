//! The worker's side of the evidence (issue 25; the format is in
//! `troop_protocol::evidence`): the upstream is asked for each generated
//! token's logprob and top alternatives; the worker keeps them, removes
//! them from the events when the app did not ask for them, and signs them
//! at the end of the answer.

use libp2p::identity::Keypair;
use serde_json::Value;
use troop_protocol::evidence::{Evidence, MAX_TOKENS, TOP_K, TokenEvidence};

/// Evidence gathered from one streamed answer.
pub struct Collector {
    tokens: Vec<TokenEvidence>,
    /// Every token so far came with an id and a logprob.
    whole: bool,
    /// The app did not ask for logprobs: they are taken out of its events.
    strip: bool,
}

impl Collector {
    pub fn new(strip: bool) -> Self {
        Self {
            tokens: Vec::new(),
            whole: true,
            strip,
        }
    }

    /// Reads the logprobs of one event (`data`, its JSON) and, when they
    /// are to be taken out, returns the event block to send instead of
    /// `raw`.
    pub fn on_event(&mut self, raw: &str, data: &str) -> Option<String> {
        if !data.contains("\"logprobs\"") {
            return None;
        }
        let mut v: Value = serde_json::from_str(data).ok()?;
        self.take(&mut v)?;
        // Only a block that is one `data:` line is rewritten (other fields
        // would be lost); anything else goes as it came.
        (self.strip && raw.starts_with("data:") && !raw.contains('\n'))
            .then(|| format!("data: {v}"))
    }

    /// The same for a whole (not streamed) answer: its JSON body, rewritten
    /// when the logprobs are to be taken out.
    pub fn on_whole(&mut self, body: &str) -> Option<String> {
        if !body.contains("\"logprobs\"") {
            return None;
        }
        let mut v: Value = serde_json::from_str(body).ok()?;
        self.take(&mut v)?;
        self.strip.then(|| v.to_string())
    }

    /// Keeps the logprobs of choice 0 and, when stripping, removes every
    /// choice's.
    fn take(&mut self, v: &mut Value) -> Option<()> {
        let choices = v.get_mut("choices")?.as_array_mut()?;
        for choice in choices.iter_mut() {
            let first = choice.get("index").and_then(Value::as_u64).unwrap_or(0) == 0;
            if first && let Some(content) = choice.pointer("/logprobs/content") {
                self.read(content);
            }
            if self.strip
                && let Some(obj) = choice.as_object_mut()
            {
                obj.remove("logprobs");
            }
        }
        Some(())
    }

    fn read(&mut self, content: &Value) {
        let Some(entries) = content.as_array() else {
            self.whole = false;
            return;
        };
        for e in entries {
            if self.tokens.len() >= MAX_TOKENS {
                return;
            }
            let id = e
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok());
            let lp = e.get("logprob").and_then(Value::as_f64);
            let (Some(id), Some(lp)) = (id, lp) else {
                self.whole = false;
                continue;
            };
            let top = e
                .get("top_logprobs")
                .and_then(Value::as_array)
                .map(|alts| {
                    alts.iter()
                        .filter_map(|a| {
                            let id = a.get("id")?.as_u64().and_then(|n| u32::try_from(n).ok())?;
                            Some((id, a.get("logprob")?.as_f64()? as f32))
                        })
                        .take(TOP_K)
                        .collect()
                })
                .unwrap_or_default();
            self.tokens.push(TokenEvidence {
                id,
                logprob: lp as f32,
                top,
            });
        }
    }

    /// The signed evidence, when every token came with what it needs.
    pub fn finish(self, key: &Keypair, job_id: &str, index: u32) -> Option<Evidence> {
        (self.whole && !self.tokens.is_empty())
            .then(|| Evidence::sign(key, job_id, index, self.tokens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // An event as llama.cpp streams it with `logprobs: true, top_logprobs: 2`.
    const EVENT: &str = r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"I"},"logprobs":{"content":[{"id":57,"token":"I","bytes":[73],"logprob":-2.2564542293548584,"top_logprobs":[{"id":57,"token":"I","bytes":[73],"logprob":-2.2564542293548584},{"id":19556,"token":"Hello","bytes":[72,101,108,108,111],"logprob":-2.3952271938323975}]}]}}],"created":1,"id":"chatcmpl-x","model":"smollm2-135m","object":"chat.completion.chunk"}"#;

    #[test]
    fn logprobs_are_kept_as_evidence_and_taken_out_when_the_app_did_not_ask() {
        let mut c = Collector::new(true);
        let out = c
            .on_event(&format!("data: {EVENT}"), EVENT)
            .expect("rewritten");
        assert!(!out.contains("logprobs"), "{out}");
        let v: Value = serde_json::from_str(out.trim_start_matches("data: ")).expect("json");
        assert_eq!(v["choices"][0]["delta"]["content"], "I");
        assert_eq!(c.tokens.len(), 1);
        assert_eq!(c.tokens[0].id, 57);
        assert_eq!(c.tokens[0].top, vec![(57, -2.2564542), (19556, -2.3952273)]);
        // An event without logprobs (the role, the end) is left alone.
        assert!(c.on_event("data: {}", "{}").is_none());
        let key = troop_protocol::identity::generate();
        let e = c.finish(&key, "job", 2).expect("evidence");
        assert_eq!(e.verify(&key.public().to_peer_id(), "job", 2), Ok(()));
        assert!(troop_protocol::evidence::check(&e.tokens, Some(0.0)).is_empty());

        // The app asked: its events go as they came.
        let mut kept = Collector::new(false);
        assert!(kept.on_event(&format!("data: {EVENT}"), EVENT).is_none());
        assert_eq!(kept.tokens.len(), 1);
        // A whole answer: the same logprobs under `choices[].logprobs`.
        let body = format!(
            r#"{{"choices":[{{"index":0,"message":{{"role":"assistant","content":"I"}},"logprobs":{}}}]}}"#,
            serde_json::from_str::<Value>(EVENT).expect("event")["choices"][0]["logprobs"]
        );
        let mut w = Collector::new(true);
        let out = w.on_whole(&body).expect("rewritten");
        let v: Value = serde_json::from_str(&out).expect("json");
        assert!(v["choices"][0].get("logprobs").is_none());
        assert_eq!(v["choices"][0]["message"]["content"], "I");
        assert_eq!(w.tokens.len(), 1);
        let mut asked = Collector::new(false);
        assert!(asked.on_whole(&body).is_none());
        assert_eq!(asked.tokens.len(), 1);
        // Tokens without ids make no evidence.
        let mut no_ids = Collector::new(false);
        let without = EVENT.replace("\"id\":57,", "");
        no_ids.on_event(&format!("data: {without}"), &without);
        assert!(no_ids.finish(&key, "job", 2).is_none());
    }
}
