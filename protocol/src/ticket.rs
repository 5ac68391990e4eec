//! Tickets: short-lived RS256 JWTs that let a user spend credits on one
//! worker for one job. The coordinator signs them; workers verify them
//! offline with the coordinator's public key.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// The issuer every ticket names.
pub const TICKET_ISSUER: &str = "troop-coordinator";
/// Default lifetime of a ticket.
pub const DEFAULT_TICKET_TTL_SECS: u64 = 300;
/// Clock skew tolerated when checking `exp`, `nbf` and `iat`.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;

/// What a ticket says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketClaims {
    /// The issuer (`troop-coordinator`).
    pub iss: String,
    /// The user who pays (PeerId).
    pub sub: String,
    /// The worker who may serve it (PeerId).
    pub aud: String,
    /// The model the user asked for.
    pub model: String,
    /// The job id; each is accepted once.
    pub jti: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    /// Most tokens the user asked for, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// The reserved amount in milli-credits.
    #[serde(default)]
    pub reserved_milli: i64,
}

/// Why a ticket was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("malformed ticket: {0}")]
    Malformed(String),
    #[error("algorithm {0} is not accepted (RS256 only)")]
    Algorithm(String),
    #[error("ticket has no key id")]
    MissingKid,
    #[error("unknown key id {0}: refresh the coordinator's keys")]
    UnknownKid(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("ticket is for {found}, not for this worker")]
    WrongAudience { found: String },
    #[error("ticket expired at {exp}")]
    Expired { exp: u64 },
    #[error("ticket not valid before {nbf}")]
    NotYetValid { nbf: u64 },
    #[error("ticket issued in the future ({iat})")]
    IssuedInFuture { iat: u64 },
    #[error("ticket {0} was already used")]
    Reused(String),
    #[error("wrong issuer {0}")]
    WrongIssuer(String),
}

/// Verifies tickets for one worker: RS256 only, `aud` must be this worker,
/// `exp`/`nbf`/`iat` checked against an injected clock, each `jti` once.
pub struct TicketVerifier {
    audience: String,
    keys: HashMap<String, DecodingKey>,
    leeway: u64,
    /// jti -> exp; entries are dropped once their ticket could no longer pass.
    seen: HashMap<String, u64>,
}

impl TicketVerifier {
    pub fn new(audience: impl Into<String>) -> Self {
        Self {
            audience: audience.into(),
            keys: HashMap::new(),
            leeway: DEFAULT_LEEWAY_SECS,
            seen: HashMap::new(),
        }
    }

    pub fn with_leeway(mut self, leeway: u64) -> Self {
        self.leeway = leeway;
        self
    }

    /// Adds (or replaces) a verification key from its PEM (SPKI or PKCS#1).
    pub fn add_key_pem(&mut self, kid: &str, pem: &[u8]) -> Result<(), TicketError> {
        let key =
            DecodingKey::from_rsa_pem(pem).map_err(|e| TicketError::Malformed(e.to_string()))?;
        self.keys.insert(kid.to_string(), key);
        Ok(())
    }

    /// Adds a key from JWK components (`n`, `e`, base64url).
    pub fn add_key_components(&mut self, kid: &str, n: &str, e: &str) -> Result<(), TicketError> {
        let key = DecodingKey::from_rsa_components(n, e)
            .map_err(|e| TicketError::Malformed(e.to_string()))?;
        self.keys.insert(kid.to_string(), key);
        Ok(())
    }

    pub fn knows_kid(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// Checks a ticket without consuming its `jti`.
    pub fn check(&self, token: &str, now: u64) -> Result<TicketClaims, TicketError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| TicketError::Malformed(e.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(TicketError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or(TicketError::MissingKid)?;
        let key = self
            .keys
            .get(&kid)
            .ok_or_else(|| TicketError::UnknownKid(kid.clone()))?;
        let mut validation = Validation::new(Algorithm::RS256);
        // Time claims are checked below against the injected clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "nbf", "aud", "sub", "iss"]);
        let data = jsonwebtoken::decode::<TicketClaims>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => TicketError::BadSignature,
                ErrorKind::InvalidAlgorithm => TicketError::Algorithm("mismatch".into()),
                _ => TicketError::Malformed(e.to_string()),
            }
        })?;
        let c = data.claims;
        if c.iss != TICKET_ISSUER {
            return Err(TicketError::WrongIssuer(c.iss));
        }
        if c.aud != self.audience {
            return Err(TicketError::WrongAudience { found: c.aud });
        }
        if now >= c.exp.saturating_add(self.leeway) {
            return Err(TicketError::Expired { exp: c.exp });
        }
        if c.nbf > now.saturating_add(self.leeway) {
            return Err(TicketError::NotYetValid { nbf: c.nbf });
        }
        if c.iat > now.saturating_add(self.leeway) {
            return Err(TicketError::IssuedInFuture { iat: c.iat });
        }
        if self.seen.contains_key(&c.jti) {
            return Err(TicketError::Reused(c.jti));
        }
        Ok(c)
    }

    /// Verifies a ticket and consumes its `jti`: the same ticket is refused
    /// the next time.
    pub fn verify(&mut self, token: &str, now: u64) -> Result<TicketClaims, TicketError> {
        let claims = self.check(token, now)?;
        self.consume(&claims, now)?;
        Ok(claims)
    }

    /// Consumes the `jti` of claims [`check`](Self::check)ed earlier:
    /// refused when another caller consumed it meanwhile.
    pub fn consume(&mut self, claims: &TicketClaims, now: u64) -> Result<(), TicketError> {
        let leeway = self.leeway;
        self.seen.retain(|_, exp| now < exp.saturating_add(leeway));
        if self.seen.contains_key(&claims.jti) {
            return Err(TicketError::Reused(claims.jti.clone()));
        }
        self.seen.insert(claims.jti.clone(), claims.exp);
        Ok(())
    }

    /// Remembers `jti` (expiring at `exp`, unix s) as used: a worker's
    /// sessions read back from its journal after a restart.
    pub fn remember(&mut self, jti: &str, exp: u64) {
        self.seen.insert(jti.to_string(), exp);
    }

    /// How many `jti`s are remembered (bounded by tickets still valid).
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }
}
