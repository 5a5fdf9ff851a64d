//! Reading the small files the two sites exchange through the cache store
//! and the target directory — the manifest, the fence, the source's stop
//! marker, point and hash requests and their answers: absent is `None`,
//! and every failure is a [`FileError`] that names the file and says
//! whether it could not be read or holds something tern refuses.

use std::io;
use std::path::{Path, PathBuf};

/// Why one of the exchanged files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The filesystem refused the read (permissions, I/O error…).
    #[error("cannot read {path}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Read, but not a valid file of its kind (torn, foreign, a newer
    /// version): the reader decides whether to wait, ignore or stop.
    #[error("{path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
}

impl FileError {
    /// A store's failure to read `path`, as a [`FileError::Unreadable`].
    pub fn from_store(path: PathBuf, e: crate::object::StoreError) -> Self {
        FileError::Unreadable { path, source: e.into_cause() }
    }

    pub fn path(&self) -> &Path {
        match self {
            FileError::Unreadable { path, .. } | FileError::Damaged { path, .. } => path,
        }
    }

    /// For readers that treat a damaged file as absent (it is rewritten
    /// or removed by its writer): `Ok(None)` for [`FileError::Damaged`],
    /// the error itself otherwise. Use as `read().or_else(FileError::damaged_as_none)`.
    pub fn damaged_as_none<T>(self) -> Result<Option<T>, FileError> {
        match self {
            FileError::Damaged { .. } => Ok(None),
            e => Err(e),
        }
    }
}

/// The file at `path` decoded by `decode`; `None` if it does not exist.
pub(crate) fn read_with<T>(
    path: &Path,
    decode: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<Option<T>, FileError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(&bytes).map(Some).map_err(|reason| FileError::Damaged { path: path.to_owned(), reason }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FileError::Unreadable { path: path.to_owned(), source }),
    }
}

/// A small TOML file; `None` if it does not exist.
pub(crate) fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, FileError> {
    read_with(path, decode_toml)
}

pub(crate) fn decode_toml<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))?;
    toml::from_str(text).map_err(|e| e.to_string())
}

/// An error and its causes on one line.
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_is_none_damaged_and_unreadable_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fence.toml");
        assert!(read_toml::<toml::Table>(&p).unwrap().is_none());
        std::fs::write(&p, "not = [toml").unwrap();
        let e = read_toml::<toml::Table>(&p).unwrap_err();
        assert!(matches!(e, FileError::Damaged { .. }), "{e:?}");
        assert!(e.to_string().starts_with(&format!("{} is damaged: ", p.display())), "{e}");
        assert!(e.damaged_as_none::<()>().unwrap().is_none());
        let e = read_toml::<toml::Table>(dir.path()).unwrap_err(); // a directory: EISDIR
        assert!(matches!(e, FileError::Unreadable { .. }), "{e:?}");
        assert_eq!(e.path(), dir.path());
        assert!(e.damaged_as_none::<()>().is_err());
    }
}
