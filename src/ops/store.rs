//! Installed models and the operation records, under the state directory,
//! written so that a power cut at any instant leaves one valid model per
//! pipeline.
//!
//! `models/{bundle}/` holds a bundle's files (`{bundle}` is its identity:
//! name, seq and a digest of its signed metadata, so the same ONNX with
//! another manifest is another directory); it is written in a staging
//! directory, every file and the directory fsynced, then renamed into
//! place, so a model directory is complete or absent. `models/active.json`
//! says which installed model each pipeline serves (absent: the config's)
//! and is replaced atomically (write, fsync, rename, fsync the directory):
//! the rename is the instant an update or a rollback takes effect. While a
//! new model is on probation the record keeps the model it replaced and the
//! operation's id; a start that finds one rolls back (the probation never
//! finished). `ops/{id}.json` is each operation's last state.

use super::bundle::{Metadata, Verified};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One installed bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Installed {
    pub sha256: String,
    pub name: String,
    pub version: String,
    pub seq: u64,
    /// The bundle's identity ([`super::bundle::bundle_id`]) and the
    /// directory under `models/` it is installed in. Records written
    /// before it existed name the directory by `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
}

impl Installed {
    /// Its directory's name under `models/`.
    pub fn dir(&self) -> &str {
        self.bundle.as_deref().unwrap_or(&self.sha256)
    }
}

/// A pipeline's model record. `current: None` is the config's model.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Active {
    pub current: Option<Installed>,
    /// What `model/rollback` returns to, when there is something to
    /// return to.
    #[serde(default)]
    pub previous: Option<Previous>,
    /// Set while `current` is on probation: the operation watching it.
    #[serde(default)]
    pub probation: Option<String>,
    /// `pipeline/disable`d: stays so across restarts until enabled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

/// The model a rollback returns to: an installed one, or (None) the config's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Previous {
    pub model: Option<Installed>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ActiveFile {
    #[serde(default)]
    pub pipelines: BTreeMap<String, Active>,
    /// Highest `seq` installed per model name (replay protection).
    #[serde(default)]
    pub highest_seq: BTreeMap<String, u64>,
}

pub struct Store {
    root: PathBuf,
}

/// Writes `bytes` to `path` so that it is either the old file or the new
/// one after a crash: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

impl Store {
    pub fn open(root: &Path) -> std::io::Result<Store> {
        std::fs::create_dir_all(root.join("models"))?;
        std::fs::create_dir_all(root.join("ops"))?;
        Ok(Store {
            root: root.to_owned(),
        })
    }

    fn models(&self) -> PathBuf {
        self.root.join("models")
    }

    pub fn ops_dir(&self) -> PathBuf {
        self.root.join("ops")
    }

    /// The manifest of an installed model.
    pub fn manifest_path(&self, installed: &Installed) -> PathBuf {
        self.models().join(installed.dir()).join("model.toml")
    }

    /// Removes an installed model's directory unless a pipeline serves it
    /// or can roll back to it (a bundle that failed to load).
    pub fn discard(&self, installed: &Installed, active: &ActiveFile) {
        if !kept(active).contains(installed.dir()) {
            let _ = std::fs::remove_dir_all(self.models().join(installed.dir()));
        }
    }

    pub fn load_active(&self) -> ActiveFile {
        let path = self.models().join("active.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                // Written atomically, so only a bug or a hand edit gets here:
                // the config's models serve, and the record is kept aside.
                tracing::error!(path = %path.display(), error = %e, "Unreadable active model record; serving the config's models");
                let _ = std::fs::rename(&path, path.with_extension("json.unreadable"));
                ActiveFile::default()
            }),
            Err(_) => ActiveFile::default(),
        }
    }

    pub fn save_active(&self, active: &ActiveFile) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(active).expect("record serializes");
        write_atomic(&self.models().join("active.json"), &bytes)
    }

    /// Writes a verified bundle's files into `models/{bundle id}/`. A
    /// complete directory of the same bundle (installed before, and still
    /// served or kept for a rollback) is reused: its identity covers every
    /// file's SHA-256.
    pub fn stage(&self, bundle: &Verified) -> std::io::Result<Installed> {
        let Metadata {
            sha256,
            name,
            version,
            seq,
            ..
        } = &bundle.meta;
        let dest = self.models().join(&bundle.id);
        let installed = Installed {
            sha256: sha256.clone(),
            name: name.clone(),
            version: version.clone(),
            seq: *seq,
            bundle: Some(bundle.id.clone()),
        };
        if dest.join("model.toml").is_file() && dest.join("model.onnx").is_file() {
            return Ok(installed);
        }
        let staging = self.models().join(format!(".staging-{}", bundle.id));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)?;
        let mut files: Vec<(&str, &[u8])> = vec![
            ("model.onnx", &bundle.model),
            ("model.toml", &bundle.manifest),
        ];
        let meta = serde_json::to_vec_pretty(&bundle.meta).expect("metadata serializes");
        files.push(("bundle.json", &meta));
        for (file, data) in files {
            let mut f = File::create(staging.join(file))?;
            f.write_all(data)?;
            f.sync_all()?;
        }
        File::open(&staging)?.sync_all()?;
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&staging, &dest)?;
        File::open(self.models())?.sync_all()?;
        Ok(installed)
    }

    /// Removes model directories no pipeline serves or can roll back to,
    /// and staging left by a crash.
    pub fn prune(&self, active: &ActiveFile) {
        let keep = kept(active);
        let Ok(dir) = std::fs::read_dir(self.models()) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = name.starts_with(".staging-")
                || (entry.path().is_dir() && !keep.contains(name.as_str()));
            if stale {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// The directories a pipeline serves or can roll back to.
fn kept(active: &ActiveFile) -> std::collections::HashSet<&str> {
    active
        .pipelines
        .values()
        .flat_map(|a| {
            let prev = a.previous.as_ref().and_then(|p| p.model.as_ref());
            a.current.iter().chain(prev)
        })
        .map(Installed::dir)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_leaves_the_old_or_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("active.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn an_unreadable_record_serves_the_config_models_and_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("models/active.json"), b"{not json").unwrap();
        assert_eq!(store.load_active(), ActiveFile::default());
        assert!(dir.path().join("models/active.json.unreadable").is_file());
    }
}
