//! Ticket verification as workers run it: every refusal the design names.

use aws_lc_rs::encoding::AsDer;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proptest::prelude::*;
use troop_protocol::ticket::{TICKET_ISSUER, TicketClaims, TicketError, TicketVerifier};

struct Keys {
    encoding: EncodingKey,
    public_pem: String,
}

fn rsa_keys() -> Keys {
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("keygen");
    let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).expect("der");
    let private_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der.as_ref().to_vec()));
    let public = aws_lc_rs::signature::KeyPair::public_key(&pair);
    let spki = AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(public).expect("spki");
    Keys {
        encoding: EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("encoding key"),
        public_pem: pem::encode(&pem::Pem::new("PUBLIC KEY", spki.as_ref().to_vec())),
    }
}

const WORKER: &str = "12D3KooWworker";
const NOW: u64 = 1_800_000_000;

fn claims(jti: &str) -> TicketClaims {
    TicketClaims {
        iss: TICKET_ISSUER.into(),
        sub: "12D3KooWuser".into(),
        aud: WORKER.into(),
        model: "gemma3".into(),
        jti: jti.into(),
        iat: NOW,
        nbf: NOW,
        exp: NOW + 300,
        max_tokens: Some(64),
        reserved_milli: 300_000,
    }
}

fn sign(keys: &Keys, kid: &str, c: &TicketClaims) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, c, &keys.encoding).expect("sign")
}

fn verifier(keys: &Keys) -> TicketVerifier {
    let mut v = TicketVerifier::new(WORKER).with_leeway(0);
    v.add_key_pem("k1", keys.public_pem.as_bytes())
        .expect("add key");
    v
}

fn b64(v: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"))
}

#[test]
fn a_good_ticket_passes_once() {
    let keys = rsa_keys();
    let mut v = verifier(&keys);
    let t = sign(&keys, "k1", &claims("job-1"));
    let c = v.verify(&t, NOW + 10).expect("valid ticket");
    assert_eq!(c, claims("job-1"));
    assert_eq!(
        v.verify(&t, NOW + 11),
        Err(TicketError::Reused("job-1".into()))
    );
    // Another job id passes.
    assert!(
        v.verify(&sign(&keys, "k1", &claims("job-2")), NOW + 12)
            .is_ok()
    );
}

#[test]
fn alg_none_is_refused() {
    let keys = rsa_keys();
    let mut v = verifier(&keys);
    let header = serde_json::json!({"alg": "none", "typ": "JWT", "kid": "k1"});
    let body = serde_json::to_value(claims("j")).expect("claims");
    let token = format!("{}.{}.", b64(&header), b64(&body));
    assert!(v.verify(&token, NOW).is_err());
}

#[test]
fn hs256_signed_with_the_public_key_is_refused() {
    let keys = rsa_keys();
    let mut v = verifier(&keys);
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    let forged = jsonwebtoken::encode(
        &h,
        &claims("j"),
        &EncodingKey::from_secret(keys.public_pem.as_bytes()),
    )
    .expect("hs256");
    assert!(matches!(
        v.verify(&forged, NOW),
        Err(TicketError::Algorithm(_))
    ));
}

#[test]
fn wrong_audience_expired_and_future_tickets_are_refused() {
    let keys = rsa_keys();
    let mut v = verifier(&keys);
    let mut c = claims("a");
    c.aud = "12D3KooWsomeoneelse".into();
    assert!(matches!(
        v.verify(&sign(&keys, "k1", &c), NOW),
        Err(TicketError::WrongAudience { .. })
    ));
    let c = claims("b");
    assert_eq!(
        v.verify(&sign(&keys, "k1", &c), NOW + 300),
        Err(TicketError::Expired { exp: NOW + 300 })
    );
    let mut c = claims("c");
    c.nbf = NOW + 100;
    assert_eq!(
        v.verify(&sign(&keys, "k1", &c), NOW),
        Err(TicketError::NotYetValid { nbf: NOW + 100 })
    );
    let mut c = claims("d");
    c.iat = NOW + 100;
    assert!(matches!(
        v.verify(&sign(&keys, "k1", &c), NOW),
        Err(TicketError::IssuedInFuture { .. })
    ));
    let mut c = claims("e");
    c.iss = "evil".into();
    assert!(matches!(
        v.verify(&sign(&keys, "k1", &c), NOW),
        Err(TicketError::WrongIssuer(_))
    ));
    // None of the refused tickets used up their jti.
    assert_eq!(v.remembered(), 0);
}

#[test]
fn unknown_kid_is_reported_and_a_foreign_key_fails() {
    let keys = rsa_keys();
    let other = rsa_keys();
    let mut v = verifier(&keys);
    assert_eq!(
        v.verify(&sign(&keys, "k2", &claims("x")), NOW),
        Err(TicketError::UnknownKid("k2".into()))
    );
    // Signed by another key under a known kid.
    assert_eq!(
        v.verify(&sign(&other, "k1", &claims("y")), NOW),
        Err(TicketError::BadSignature)
    );
    // Tampered payload.
    let t = sign(&keys, "k1", &claims("z"));
    let mut parts: Vec<String> = t.split('.').map(String::from).collect();
    let mut c = claims("z");
    c.aud = WORKER.into();
    c.reserved_milli = 1;
    parts[1] = b64(&serde_json::to_value(&c).expect("json"));
    assert_eq!(
        v.verify(&parts.join("."), NOW),
        Err(TicketError::BadSignature)
    );
    assert!(matches!(
        v.verify("garbage", NOW),
        Err(TicketError::Malformed(_))
    ));
    // The key can be added after the fact (refresh on unknown kid).
    v.add_key_pem("k2", keys.public_pem.as_bytes())
        .expect("add");
    assert!(v.verify(&sign(&keys, "k2", &claims("x")), NOW).is_ok());
}

#[test]
fn remembered_jtis_are_dropped_after_expiry() {
    let keys = rsa_keys();
    let mut v = verifier(&keys);
    v.verify(&sign(&keys, "k1", &claims("old")), NOW)
        .expect("ok");
    assert_eq!(v.remembered(), 1);
    let mut c = claims("new");
    c.iat = NOW + 400;
    c.nbf = NOW + 400;
    c.exp = NOW + 700;
    v.verify(&sign(&keys, "k1", &c), NOW + 400).expect("ok");
    assert_eq!(v.remembered(), 1, "the expired jti was forgotten");
}

proptest! {
    #[test]
    fn claims_round_trip_through_json(jti in "[a-f0-9]{1,32}", model in ".{1,40}", iat in 0u64..1u64<<40, mt in proptest::option::of(any::<u32>()), r in any::<i64>()) {
        let mut c = claims(&jti);
        c.model = model;
        c.iat = iat;
        c.max_tokens = mt;
        c.reserved_milli = r;
        let back: TicketClaims = serde_json::from_str(&serde_json::to_string(&c).expect("ser")).expect("de");
        prop_assert_eq!(back, c);
    }
}
