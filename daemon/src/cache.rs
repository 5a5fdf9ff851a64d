//! Opening the cache store and a VM's part of it, sealed with the VM's
//! key when it has one. The source site's key is in `vm.toml` (`tern
//! enable --key`); the target site's commands take `--key FILE` (one VM,
//! or every VM sharing it) or `--keys DIR` (`<vm>.key` per VM).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result};
use tern_driver::vm::VmConfig;
use tern_store::cache::CacheDir;
use tern_store::object::Store;
use tern_store::seal::Key;

/// Where the target site's keys come from.
#[derive(Debug, Clone, Default)]
pub enum Keys {
    /// Segments are not sealed.
    #[default]
    None,
    /// One key for every VM.
    File(PathBuf),
    /// `<dir>/<vm>.key`.
    Dir(PathBuf),
}

static KEYS: OnceLock<Keys> = OnceLock::new();

/// Set once, from the command line.
pub fn set_keys(keys: Keys) {
    let _ = KEYS.set(keys);
}

/// The store `location` names (a directory, `s3://…`, `az://…`).
pub fn open_store(location: &Path) -> Result<Store> {
    Ok(Store::open(location)?)
}

/// A VM's part of the cache, sealed with the key the command line gives
/// for it (the target site).
pub fn for_vm(store: &Store, vm: &str) -> Result<CacheDir> {
    let key = key_file_for(vm).as_deref().map(load).transpose()?;
    Ok(CacheDir::new(store, vm).sealed_with(key))
}

/// The key file the command line gives for `vm`, if any: a direction
/// re-protected from this site seals with it too.
pub fn key_file_for(vm: &str) -> Option<PathBuf> {
    match KEYS.get().unwrap_or(&Keys::None) {
        Keys::None => None,
        Keys::File(path) => Some(path.clone()),
        Keys::Dir(dir) => Some(dir.join(format!("{vm}.key"))),
    }
}

/// The source's part of the cache for a VM, sealed with its `vm.toml` key.
pub fn for_source(config: &VmConfig) -> Result<CacheDir> {
    let store = open_store(&config.cache)?;
    let key = config.key.as_deref().map(load).transpose()?;
    Ok(CacheDir::new(&store, &config.name).sealed_with(key))
}

fn load(path: &Path) -> Result<Key> {
    Key::load(path).context("cannot load the sealing key")
}
