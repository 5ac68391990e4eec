//! Which weights a model name stands for: the SHA-256 of its GGUF file.
//!
//! llama.cpp's `/props` names the file it loaded (`model_path`) and its
//! build (`build_info`); when the model server runs on another machine,
//! `troop worker --model-file PATH` names a local copy instead. Ollama's
//! `/api/show` names the blob (`FROM …/blobs/sha256-<hex>`), whose name is
//! already its digest. A file is hashed once and hashed again only when
//! its size or modification time changes.

use std::collections::{HashMap, HashSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};
use troop_protocol::sync::MutexExt as _;

/// `sha256:<64 hex>` of a file's bytes.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// The digest in an Ollama modelfile's `FROM` line
/// (`FROM /root/.ollama/models/blobs/sha256-<64 hex>`), as `sha256:<hex>`.
pub fn ollama_blob_digest(modelfile: &str) -> Option<String> {
    modelfile.lines().find_map(|l| {
        let from = l.trim().strip_prefix("FROM ")?;
        let (_, hex) = from.trim().rsplit_once("sha256-")?;
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| format!("sha256:{}", hex.to_ascii_lowercase()))
    })
}

/// A file's size and modification time when it was hashed, and its digest.
type Hashed = (u64, Option<SystemTime>, String);

/// Digests of files already hashed, by path, with the size and
/// modification time they had then.
#[derive(Clone, Default)]
pub struct DigestCache {
    known: Arc<Mutex<HashMap<PathBuf, Hashed>>>,
    /// Paths already reported missing (logged once).
    warned: Arc<Mutex<HashSet<PathBuf>>>,
}

impl DigestCache {
    /// The digest of `path`, hashed on a blocking thread unless known for
    /// this size and time; None (logged once per path) when it cannot be
    /// read here.
    pub async fn digest(&self, path: &Path) -> Option<String> {
        let meta = match tokio::fs::metadata(path).await {
            Ok(m) if m.is_file() => m,
            other => {
                let why = match other {
                    Ok(_) => "not a file".to_string(),
                    Err(e) => e.to_string(),
                };
                if self
                    .warned
                    .locked()
                    .is_some_and(|mut w| w.insert(path.to_path_buf()))
                {
                    tracing::warn!(file = %path.display(), error = %why, "cannot read the model file here, so its digest is not advertised (is the model server on another machine? give `troop worker --model-file` a local copy)");
                }
                return None;
            }
        };
        let (len, modified) = (meta.len(), meta.modified().ok());
        if let Some(k) = self.known.locked()
            && let Some((l, m, d)) = k.get(path)
            && *l == len
            && *m == modified
        {
            return Some(d.clone());
        }
        let p = path.to_path_buf();
        let started = std::time::Instant::now();
        let hashed = tokio::task::spawn_blocking(move || hash_file(&p)).await;
        match hashed {
            Ok(Ok(d)) => {
                tracing::info!(file = %path.display(), digest = %d, bytes = len, ms = started.elapsed().as_millis() as u64, "model file hashed");
                if let Some(mut k) = self.known.locked() {
                    k.insert(path.to_path_buf(), (len, modified, d.clone()));
                }
                Some(d)
            }
            Ok(Err(e)) => {
                tracing::warn!(file = %path.display(), error = %e, "the model file could not be hashed");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "hashing the model file stopped");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_is_hashed_once_and_again_when_it_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, b"abc").expect("write");
        let cache = DigestCache::default();
        // SHA-256("abc").
        let abc = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(cache.digest(&path).await.as_deref(), Some(abc));
        assert_eq!(cache.known.locked().map(|k| k.len()), Some(1));
        std::fs::write(&path, b"abcd").expect("rewrite");
        let changed = cache.digest(&path).await.expect("digest");
        assert_ne!(changed, abc);
        assert_eq!(Some(changed), hash_file(&path).ok());
        assert_eq!(cache.digest(&dir.path().join("missing.gguf")).await, None);
    }

    #[test]
    fn the_blob_an_ollama_modelfile_names_is_its_digest() {
        let hex = "0123456789abcdef".repeat(4);
        let mf = format!(
            "# Modelfile generated by \"ollama show\"\nFROM /root/.ollama/models/blobs/sha256-{hex}\nTEMPLATE \"\"\"{{{{ .Prompt }}}}\"\"\"\n"
        );
        assert_eq!(ollama_blob_digest(&mf), Some(format!("sha256:{hex}")));
        assert_eq!(ollama_blob_digest("FROM llama3:8b\n"), None);
    }
}
