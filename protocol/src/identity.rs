//! Account ids and key files.
//!
//! Every participant has one ed25519 key. Its libp2p `PeerId` (base58,
//! `12D3KooW...`) is also its account id on the ledger.

use std::io::Write;
use std::path::Path;

use libp2p_identity::{Keypair, PeerId, PublicKey};

use crate::TroopError;

/// An account id is a libp2p `PeerId`.
pub type AccountId = PeerId;

/// Parses an account id, refusing anything that is not an ed25519 `PeerId`
/// (whose public key can be recovered from the id itself).
pub fn parse_account_id(s: &str) -> Result<AccountId, TroopError> {
    let peer: PeerId = s
        .parse()
        .map_err(|e| TroopError::InvalidAccountId(short(s), format!("{e}")))?;
    public_key_of(&peer)
        .ok_or_else(|| TroopError::InvalidAccountId(short(s), "not an ed25519 peer id".into()))?;
    Ok(peer)
}

fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Recovers the public key inlined in an ed25519 `PeerId` (identity multihash).
pub fn public_key_of(peer: &PeerId) -> Option<PublicKey> {
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    let key = PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    key.clone().try_into_ed25519().ok()?;
    (PeerId::from_public_key(&key) == *peer).then_some(key)
}

/// Generates a fresh ed25519 keypair.
pub fn generate() -> Keypair {
    Keypair::generate_ed25519()
}

/// Writes a keypair (protobuf encoding) to `path` with mode 0600, refusing
/// to overwrite an existing file.
pub fn write_keypair(path: &Path, key: &Keypair) -> Result<(), TroopError> {
    let bytes = key
        .to_protobuf_encoding()
        .map_err(|e| TroopError::IdentityFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(path).map_err(|e| TroopError::IdentityFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    Ok(())
}

/// Reads a keypair written by [`write_keypair`].
pub fn read_keypair(path: &Path) -> Result<Keypair, TroopError> {
    let err = |reason: String| TroopError::IdentityFile {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let key = Keypair::from_protobuf_encoding(&bytes).map_err(|e| err(e.to_string()))?;
    if key.clone().try_into_ed25519().is_err() {
        return Err(err("not an ed25519 key".into()));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_recovers_its_key_and_parses() {
        let key = generate();
        let peer = key.public().to_peer_id();
        assert!(peer.to_base58().starts_with("12D3KooW"));
        assert_eq!(public_key_of(&peer), Some(key.public()));
        assert_eq!(parse_account_id(&peer.to_base58()).expect("parse"), peer);
        assert!(parse_account_id("not-a-peer").is_err());
        assert!(parse_account_id("").is_err());
    }

    #[test]
    fn key_file_is_private_and_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/id.key");
        let key = generate();
        write_keypair(&path, &key).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let back = read_keypair(&path).expect("read");
        assert_eq!(back.public(), key.public());
        assert!(write_keypair(&path, &key).is_err(), "must not overwrite");
        std::fs::write(dir.path().join("junk"), b"junk").expect("write junk");
        assert!(read_keypair(&dir.path().join("junk")).is_err());
    }
}
