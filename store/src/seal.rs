//! Sealed objects: a cache store nobody vouches for sees segments and
//! manifests only encrypted and authenticated (XChaCha20-Poly1305, a
//! 256-bit key per VM). The associated data binds each object to where it
//! belongs — the VM, the epoch and the sequence range its name claims —
//! so a store that swaps two objects, replays an old one under a new
//! name, truncates or reorders them is caught by the tag, not trusted.
//!
//! ```text
//! key file  = "tern-key 1\n" | 64 hex digits | "\n"                     mode 0600
//! sealed    = { [u8;8] magic "TERNSEAL" | u32 version (1) | u32 kind
//!             | u64 epoch | u64 first_seq | u64 last_seq | [u8;24] nonce }   64 bytes, in clear
//!             | ciphertext | [u8;16] Poly1305 tag
//! aad       = the 64 clear bytes | [u8;16] vm id (segments) or the VM's name (manifest)
//! ```
//!
//! `kind` is 1 for a segment (its epoch and range in clear, checked
//! against its name by the reader), 2 for a manifest (epoch and range 0).
//! Without a key, segments keep their own checksums as before; objects
//! that are sealed are refused by a reader without the key, and plain
//! ones by a reader with one.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use rand::RngCore;

pub const MAGIC: [u8; 8] = *b"TERNSEAL";
pub const VERSION: u32 = 1;
pub const HEADER_SIZE: usize = 64;
const TAG_SIZE: usize = 16;
const KEY_FILE_TAG: &str = "tern-key 1";

/// What a sealed object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Segment = 1,
    Manifest = 2,
}

/// Where a sealed object claims to belong, bound into its tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding<'a> {
    pub kind: Kind,
    pub epoch: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The VM's id (segments) or name (manifests).
    pub owner: &'a [u8],
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read the key file {path}")]
    KeyUnreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a tern key file ({reason}); make one with `tern keygen {path}`")]
    KeyDamaged { path: PathBuf, reason: String },
    #[error("{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    KeyExposed { path: PathBuf, mode: u32 },
    #[error("not sealed, but a key was given: written by a shipper without the key, or not by tern")]
    NotSealed,
    #[error("sealed, but no key was given (pass --key FILE, or --keys DIR holding <vm>.key)")]
    NoKey,
    #[error("damaged seal: {0}")]
    Damaged(String),
    #[error(
        "does not authenticate: a different key, or the object was altered, truncated, or moved from another VM, epoch or name"
    )]
    Forged,
}

/// A VM's sealing key.
#[derive(Clone)]
pub struct Key {
    cipher: XChaCha20Poly1305,
    path: PathBuf,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.path.display()) // never the key itself
    }
}

impl Key {
    /// Writes a new random key to `path` (which must not exist), mode 0600.
    pub fn generate(path: &Path) -> io::Result<()> {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        writeln!(f, "{KEY_FILE_TAG}\n{hex}")?;
        f.sync_all()?;
        tern_driver::fs::sync_parent_dir(path).map_err(|e| io::Error::other(e.with_causes()))
    }

    pub fn load(path: &Path) -> Result<Key, SealError> {
        let unreadable = |source| SealError::KeyUnreadable { path: path.to_owned(), source };
        let meta = fs::metadata(path).map_err(unreadable)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SealError::KeyExposed { path: path.to_owned(), mode });
        }
        let text = fs::read_to_string(path).map_err(unreadable)?;
        let damaged = |reason: &str| SealError::KeyDamaged { path: path.to_owned(), reason: reason.into() };
        let mut lines = text.lines();
        if lines.next() != Some(KEY_FILE_TAG) {
            return Err(damaged(&format!("its first line is not '{KEY_FILE_TAG}'")));
        }
        let hex = lines.next().unwrap_or("").trim();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(damaged("its second line is not 64 hex digits"));
        }
        let bytes: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
        let cipher = XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| damaged("bad key length"))?;
        Ok(Key { cipher, path: path.to_owned() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `plain` sealed, bound to `binding`.
    pub fn seal(&self, plain: &[u8], binding: &Binding) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let header = header(binding, &nonce);
        let aad = [&header[..], binding.owner].concat();
        let sealed = self
            .cipher
            .encrypt(&XNonce::from(nonce), Payload { msg: plain, aad: &aad })
            .expect("XChaCha20-Poly1305 seals any length tern writes");
        [&header[..], &sealed].concat()
    }

    /// The plain bytes of `object`, if it was sealed with this key for
    /// exactly `binding`.
    pub fn open(&self, object: &[u8], binding: &Binding) -> Result<Vec<u8>, SealError> {
        if !is_sealed(object) {
            return Err(SealError::NotSealed);
        }
        if object.len() < HEADER_SIZE + TAG_SIZE {
            return Err(SealError::Damaged(format!("{} bytes, shorter than a seal", object.len())));
        }
        let version = u32::from_le_bytes(object[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(SealError::Damaged(format!("seal version {version} (this tern reads {VERSION})")));
        }
        let nonce: [u8; 24] = object[40..64].try_into().unwrap();
        // The clear header must be the one the reader expects: the tag
        // covers it, but a mismatch here says more than "forged".
        let expected = header(binding, &nonce);
        if object[..HEADER_SIZE] != expected[..] {
            let field = |o: usize| u64::from_le_bytes(object[o..o + 8].try_into().unwrap());
            return Err(SealError::Damaged(format!(
                "sealed as kind {} epoch {} seqs {}-{}, expected kind {} epoch {} seqs {}-{}",
                u32::from_le_bytes(object[12..16].try_into().unwrap()),
                field(16),
                field(24),
                field(32),
                binding.kind as u32,
                binding.epoch,
                binding.first_seq,
                binding.last_seq
            )));
        }
        let aad = [&object[..HEADER_SIZE], binding.owner].concat();
        self.cipher
            .decrypt(&XNonce::from(nonce), Payload { msg: &object[HEADER_SIZE..], aad: &aad })
            .map_err(|_| SealError::Forged)
    }
}

/// The epoch a sealed segment claims (in clear), to bind the reader's
/// expectation before it opens it.
pub fn sealed_epoch(object: &[u8]) -> Option<u64> {
    (is_sealed(object) && object.len() >= HEADER_SIZE).then(|| u64::from_le_bytes(object[16..24].try_into().unwrap()))
}

pub fn is_sealed(object: &[u8]) -> bool {
    object.starts_with(&MAGIC)
}

fn header(b: &Binding, nonce: &[u8; 24]) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(b.kind as u32).to_le_bytes());
    h[16..24].copy_from_slice(&b.epoch.to_le_bytes());
    h[24..32].copy_from_slice(&b.first_seq.to_le_bytes());
    h[32..40].copy_from_slice(&b.last_seq.to_le_bytes());
    h[40..64].copy_from_slice(nonce);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: &Path, name: &str) -> Key {
        let p = dir.join(name);
        Key::generate(&p).unwrap();
        Key::load(&p).unwrap()
    }

    #[test]
    fn sealed_objects_open_only_where_they_belong() {
        let dir = tempfile::tempdir().unwrap();
        let (k, other) = (key(dir.path(), "a.key"), key(dir.path(), "b.key"));
        let vm = [7u8; 16];
        let at = Binding { kind: Kind::Segment, epoch: 2, first_seq: 10, last_seq: 19, owner: &vm };
        let sealed = k.seal(b"records", &at);
        assert_eq!(k.open(&sealed, &at).unwrap(), b"records");
        assert_eq!(sealed_epoch(&sealed), Some(2));
        // Another key, VM, name (range) or epoch; a flipped bit; a cut.
        assert!(matches!(other.open(&sealed, &at), Err(SealError::Forged)));
        let vm2 = [8u8; 16];
        assert!(matches!(k.open(&sealed, &Binding { owner: &vm2, ..at }), Err(SealError::Forged)));
        assert!(matches!(k.open(&sealed, &Binding { first_seq: 20, last_seq: 29, ..at }), Err(SealError::Damaged(_))));
        assert!(matches!(k.open(&sealed, &Binding { epoch: 3, ..at }), Err(SealError::Damaged(_))));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(k.open(&flipped, &at), Err(SealError::Forged)));
        let mut header_edit = sealed.clone();
        header_edit[16] = 3; // claim epoch 3, and expect it
        assert!(matches!(k.open(&header_edit, &Binding { epoch: 3, ..at }), Err(SealError::Forged)));
        assert!(matches!(k.open(&sealed[..sealed.len() - 1], &at), Err(SealError::Forged)));
        assert!(matches!(k.open(&sealed[..20], &at), Err(SealError::Damaged(_))));
        assert!(matches!(k.open(b"TERNSEGM plain", &at), Err(SealError::NotSealed)));
        // Two seals of the same bytes differ (fresh nonce).
        assert_ne!(k.seal(b"records", &at), sealed);
    }

    #[test]
    fn key_files_are_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm1.key");
        Key::generate(&p).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(Key::generate(&p).is_err(), "never overwrites a key");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Key::load(&p), Err(SealError::KeyExposed { .. })));
        fs::write(&p, "hello\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let e = Key::load(&p).unwrap_err().to_string();
        assert!(e.contains("is not a tern key file") && e.contains("tern keygen"), "{e}");
        assert!(format!("{:?}", key(dir.path(), "x.key")).contains("x.key"));
    }
}
