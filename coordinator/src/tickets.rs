//! The coordinator's RSA-2048 ticket key and RS256 ticket signing.
//!
//! The key pair is made at first start and kept in `DIR/keys/`:
//! `ticket-signing.pem` (PKCS#8, mode 0400) and `ticket-signing.pub.pem`
//! (SPKI). The key id (`kid`) is the first 16 hex digits of the SHA-256 of
//! the public key's DER, so it changes exactly when the key changes.
//!
//! Several replicas share one key instead: `troop-coordinator keygen --out
//! PATH` makes it and `serve --key-file PATH` uses it. To rotate, each
//! replica moves to the new key file with the old one as
//! `--previous-key-file`: the JWKS lists both until old tickets expire.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use aws_lc_rs::encoding::AsDer;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sha2::{Digest, Sha256};
use troop_protocol::ticket::TicketClaims;

const PRIVATE_FILE: &str = "ticket-signing.pem";
const PUBLIC_FILE: &str = "ticket-signing.pub.pem";

/// The signing key, its public half and its id.
pub struct TicketKeys {
    pub kid: String,
    encoding: EncodingKey,
    pub public_pem: String,
    pub jwks: JwkSet,
}

impl TicketKeys {
    /// Loads the key pair from `dir`, making one first if there is none.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Self> {
        let private_path = dir.join(PRIVATE_FILE);
        if !private_path.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let pem_text = new_private_pem()?;
            write_new(&private_path, pem_text.as_bytes(), 0o400)?;
            tracing::info!(path = %private_path.display(), "made a new RSA-2048 ticket signing key");
        }
        let private_pem = std::fs::read(&private_path)
            .with_context(|| format!("reading {}", private_path.display()))?;
        Self::from_private_pem(&private_pem, Some(&dir.join(PUBLIC_FILE)))
    }

    /// Writes a new RSA-2048 key (PKCS#8 PEM, mode 0400) to `path`, which
    /// must not exist yet, and returns its key id. Replicas that share this
    /// file (`serve --key-file`) sign tickets every worker accepts.
    pub fn generate_to(path: &Path) -> anyhow::Result<String> {
        if path.exists() {
            bail!(
                "{} exists already; a key is never overwritten",
                path.display()
            );
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let pem_text = new_private_pem()?;
        write_new(path, pem_text.as_bytes(), 0o400)?;
        Ok(Self::from_private_pem(pem_text.as_bytes(), None)?.kid)
    }

    /// Loads the signing key from a file made by [`generate_to`](Self::generate_to)
    /// (or any PKCS#8 RSA key of 2048 bits or more).
    pub fn load_file(path: &Path) -> anyhow::Result<Self> {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_private_pem(&pem, None).with_context(|| format!("in {}", path.display()))
    }

    /// Also lists the public half of an earlier key in the JWKS, so tickets
    /// it signed (by a replica not rotated yet, or before the rotation)
    /// still verify; it never signs again. Returns its key id.
    pub fn add_previous(&mut self, path: &Path) -> anyhow::Result<String> {
        let old = Self::load_file(path)?;
        // The JWKS holds the signing key too: a key already there is skipped.
        let listed = |k: &Jwk| k.common.key_id.as_deref() == Some(old.kid.as_str());
        if !self.jwks.keys.iter().any(listed) {
            self.jwks.keys.extend(old.jwks.keys);
        }
        Ok(old.kid)
    }

    fn from_private_pem(private_pem: &[u8], public_path: Option<&Path>) -> anyhow::Result<Self> {
        let parsed = pem::parse(private_pem).context("ticket key is not PEM")?;
        if parsed.tag() != "PRIVATE KEY" {
            bail!(
                "ticket key must be a PKCS#8 PRIVATE KEY, found {}",
                parsed.tag()
            );
        }
        let pair = aws_lc_rs::rsa::KeyPair::from_pkcs8(parsed.contents())
            .map_err(|e| anyhow::anyhow!("ticket key rejected: {e}"))?;
        if pair.public_modulus_len() * 8 < 2048 {
            bail!("ticket key must be at least 2048 bits");
        }
        let public = aws_lc_rs::signature::KeyPair::public_key(&pair);
        let spki = AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(public)
            .map_err(|_| anyhow::anyhow!("public key encoding failed"))?;
        let public_pem = pem::encode(&pem::Pem::new("PUBLIC KEY", spki.as_ref().to_vec()));
        if let Some(p) = public_path
            && std::fs::read_to_string(p).ok().as_deref() != Some(public_pem.as_str())
        {
            let _ = std::fs::remove_file(p);
            write_new(p, public_pem.as_bytes(), 0o444)?;
        }
        let kid = hex::encode(Sha256::digest(spki.as_ref()))[..16].to_string();
        let encoding = EncodingKey::from_rsa_pem(private_pem).context("loading the ticket key")?;
        let mut jwk =
            Jwk::from_encoding_key(&encoding, Algorithm::RS256).context("building the JWK")?;
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        jwk.common.key_algorithm = Some(KeyAlgorithm::RS256);
        Ok(Self {
            kid,
            encoding,
            public_pem,
            jwks: JwkSet { keys: vec![jwk] },
        })
    }

    /// Signs a ticket (RS256, with this key's `kid`).
    pub fn sign(&self, claims: &TicketClaims) -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).context("signing a ticket")
    }
}

/// A new RSA-2048 private key, PKCS#8 PEM.
fn new_private_pem() -> anyhow::Result<String> {
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .map_err(|_| anyhow::anyhow!("RSA key generation failed"))?;
    let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair)
        .map_err(|_| anyhow::anyhow!("RSA key encoding failed"))?;
    Ok(pem::encode(&pem::Pem::new(
        "PRIVATE KEY",
        der.as_ref().to_vec(),
    )))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}
