//! Signed model bundles: one file a publisher signs once and every gateway
//! verifies before it parses anything.
//!
//! A bundle is an uncompressed tar holding `bundle.json` (first), the model
//! as `model.onnx`, its manifest as `model.toml` (`file` and `sha256` set to
//! the bundled model), and optionally `reference.json`: inputs with the
//! outputs the publisher's edgeinfer gave, which the gateway reproduces
//! before it swaps the model in. The signature is minisign's, detached
//! (`BUNDLE.minisig`), so `minisign -Vm BUNDLE -p KEY.pub` verifies it and
//! `minisign -Sm BUNDLE` can sign it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::Path;

pub const FORMAT: u32 = 1;
const MODEL: &str = "model.onnx";
const MANIFEST: &str = "model.toml";
const REFERENCE: &str = "reference.json";
const META: &str = "bundle.json";

/// `bundle.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub format: u32,
    /// The model's name (the manifest's), which `seq` counts for.
    pub name: String,
    pub version: String,
    /// Increases with every bundle of this name; a gateway refuses one
    /// lower than the highest it installed (a replay or a downgrade).
    pub seq: u64,
    /// Unix seconds after which the bundle is refused.
    pub not_after: u64,
    pub created: u64,
    /// The model file's SHA-256 (also the directory it is installed in).
    pub sha256: String,
    pub size: u64,
    /// Every other file: name → SHA-256.
    pub files: BTreeMap<String, String>,
}

/// A bundle whose signature and contents were checked.
#[derive(Debug)]
pub struct Verified {
    /// [`bundle_id`]: the directory it is installed in.
    pub id: String,
    pub meta: Metadata,
    pub model: Vec<u8>,
    pub manifest: Vec<u8>,
    pub reference: Option<Reference>,
    /// Which trusted key signed it (minisign key id, hex).
    pub key_id: String,
}

/// `reference.json`: what the model must answer on the gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// Largest difference accepted, relative to max(1, |expected|).
    #[serde(default = "default_tolerance")]
    pub tolerance: f32,
    pub cases: Vec<ReferenceCase>,
}

fn default_tolerance() -> f32 {
    0.02
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceCase {
    /// Raw input as the pipeline's preprocessing takes it (a window's
    /// samples, or an image's pixels fitted to the model), flat.
    pub input: Vec<f32>,
    /// Its first output (the manifest's output), flat.
    pub output: Vec<f32>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BundleError {
    #[error("signature: {0}")]
    Signature(String),
    #[error("bundle: {0}")]
    Format(String),
    #[error("bundle {name} expired at {not_after} (unix s; now {now})")]
    Expired {
        name: String,
        not_after: u64,
        now: u64,
    },
}

/// What `bundle create` is given.
pub struct CreateArgs<'a> {
    pub model: &'a Path,
    pub version: String,
    pub seq: u64,
    pub not_after: u64,
    pub reference: Option<Reference>,
}

fn sha(bytes: &[u8]) -> String {
    crate::model::hex(&Sha256::digest(bytes))
}

pub fn now_s() -> u64 {
    crate::flow::unix_ms() / 1000
}

/// Builds a bundle from a manifest (or bare `.onnx`): the manifest is
/// rewritten to name the bundled file and pin its SHA-256.
pub fn create(args: CreateArgs) -> Result<Vec<u8>, String> {
    let (_, onnx, name) = crate::model::locate(args.model).map_err(|e| e.to_string())?;
    let model = std::fs::read(&onnx).map_err(|e| format!("{}: {e}", onnx.display()))?;
    let manifest_path = match args.model.extension().and_then(|e| e.to_str()) {
        Some("toml") => Some(args.model.to_path_buf()),
        _ => Some(args.model.with_extension("toml")).filter(|p| p.is_file()),
    };
    let mut table: toml::Table = match &manifest_path {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .parse()
            .map_err(|e| format!("{}: {e}", p.display()))?,
        None => toml::Table::new(),
    };
    let sha256 = sha(&model);
    table.insert("name".into(), name.clone().into());
    table.insert("file".into(), MODEL.into());
    table.insert("sha256".into(), sha256.clone().into());
    let manifest = toml::to_string(&table)
        .map_err(|e| e.to_string())?
        .into_bytes();
    let reference = args
        .reference
        .map(|r| serde_json::to_vec(&r).expect("reference serializes"));
    let mut files = BTreeMap::from([(MANIFEST.to_string(), sha(&manifest))]);
    if let Some(r) = &reference {
        files.insert(REFERENCE.into(), sha(r));
    }
    let meta = Metadata {
        format: FORMAT,
        name,
        version: args.version,
        seq: args.seq,
        not_after: args.not_after,
        created: now_s(),
        sha256,
        size: model.len() as u64,
        files,
    };
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(meta.created);
        header.set_cksum();
        tar.append_data(&mut header, name, data)
            .map_err(|e| e.to_string())
    };
    add(
        META,
        &serde_json::to_vec_pretty(&meta).expect("metadata serializes"),
    )?;
    add(MODEL, &model)?;
    add(MANIFEST, &manifest)?;
    if let Some(r) = &reference {
        add(REFERENCE, r)?;
    }
    tar.into_inner().map_err(|e| e.to_string())
}

/// A new key pair as minisign writes it: (public key file, secret key
/// file). The secret key is not password-protected: keep it on the
/// publishing host (or make an encrypted one with `minisign -G`).
pub fn keygen() -> Result<(String, String), String> {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().map_err(|e| e.to_string())?;
    let public = kp.pk.to_box().map_err(|e| e.to_string())?.into_string();
    let secret = kp
        .sk
        .to_box(Some("edgeinfer bundle signing key"))
        .map_err(|e| e.to_string())?
        .into_string();
    Ok((public, secret))
}

/// Signs `bundle` with a minisign secret key (its file's text); returns the
/// `.minisig` text. `password` for an encrypted key.
pub fn sign(bundle: &[u8], secret_key: &str, password: Option<String>) -> Result<String, String> {
    let sk_box = minisign::SecretKeyBox::from_string(secret_key).map_err(|e| e.to_string())?;
    let sk = match password {
        Some(p) => sk_box.into_secret_key(Some(p)),
        None => sk_box.into_unencrypted_secret_key(),
    }
    .map_err(|e| format!("secret key: {e}"))?;
    let meta = read_meta_unverified(bundle)?;
    let comment = format!(
        "edgeinfer bundle {} {} seq {}",
        meta.name, meta.version, meta.seq
    );
    let sig = minisign::sign(None, &sk, Cursor::new(bundle), Some(&comment), None)
        .map_err(|e| e.to_string())?;
    Ok(sig.into_string())
}

/// A trusted public key: the base64 line, or a whole `.pub` file's text.
pub fn public_key(text: &str) -> Result<minisign::PublicKey, String> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
        .unwrap_or("");
    minisign::PublicKey::from_base64(line).map_err(|e| e.to_string())
}

fn key_id(pk: &minisign::PublicKey) -> String {
    // The key id is bytes 2..10 of the decoded key (after the algorithm).
    let bytes = pk.to_bytes();
    bytes[2..10]
        .iter()
        .rev()
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// Checks the signature against the trusted keys first, then the contents
/// and the expiry. Nothing of the bundle is parsed before the signature
/// holds.
pub fn verify(
    bundle: &[u8],
    signature: &str,
    trusted: &[minisign::PublicKey],
    now: u64,
) -> Result<Verified, BundleError> {
    let sig = minisign::SignatureBox::from_string(signature)
        .map_err(|e| BundleError::Signature(format!("unreadable: {e}")))?;
    if trusted.is_empty() {
        return Err(BundleError::Signature(
            "no trusted key configured (operations.trusted_keys)".into(),
        ));
    }
    let mut last = String::from("signed by a key that is not trusted");
    let mut signer = None;
    for pk in trusted {
        match minisign::verify(pk, &sig, Cursor::new(bundle), true, false, false) {
            Ok(()) => {
                signer = Some(key_id(pk));
                break;
            }
            Err(e) if e.to_string().contains("different from public key") => {}
            Err(e) => last = e.to_string(),
        }
    }
    let key_id = signer.ok_or(BundleError::Signature(last))?;
    let (meta, mut files) = unpack(bundle).map_err(BundleError::Format)?;
    if meta.not_after <= now {
        return Err(BundleError::Expired {
            name: meta.name,
            not_after: meta.not_after,
            now,
        });
    }
    let model = files.remove(MODEL).expect("unpack checked it");
    let manifest = files.remove(MANIFEST).expect("unpack checked it");
    check_manifest(&manifest, &meta).map_err(BundleError::Format)?;
    let reference = match files.remove(REFERENCE) {
        Some(r) => Some(
            serde_json::from_slice(&r)
                .map_err(|e| BundleError::Format(format!("{REFERENCE}: {e}")))?,
        ),
        None => None,
    };
    Ok(Verified {
        id: bundle_id(&meta),
        meta,
        model,
        manifest,
        reference,
        key_id,
    })
}

/// What runs is what was signed: the manifest must load the bundled
/// `model.onnx` (no `file` elsewhere, on the device or up the tree) and,
/// when it pins a SHA-256, the bundled model's.
fn check_manifest(manifest: &[u8], meta: &Metadata) -> Result<(), String> {
    let text = std::str::from_utf8(manifest).map_err(|_| format!("{MANIFEST} is not UTF-8"))?;
    let table: toml::Table = text.parse().map_err(|e| format!("{MANIFEST}: {e}"))?;
    match table.get("file") {
        None => {}
        Some(toml::Value::String(f)) if f == MODEL => {}
        Some(other) => {
            let shown: String = other.to_string().chars().take(80).collect();
            return Err(format!(
                "{MANIFEST} names file = {shown}; a bundle's manifest must load its own {MODEL}"
            ));
        }
    }
    match table.get("sha256") {
        None => {}
        Some(toml::Value::String(h)) if h.eq_ignore_ascii_case(&meta.sha256) => {}
        Some(_) => {
            return Err(format!(
                "{MANIFEST} pins another sha256 than the bundled {MODEL} ({})",
                meta.sha256
            ))
        }
    }
    Ok(())
}

/// A bundle's identity: its name and seq with the first 16 hex digits of
/// the SHA-256 of its signed metadata (which lists every file's SHA-256).
/// Two bundles of the same ONNX with different manifests differ here.
pub fn bundle_id(meta: &Metadata) -> String {
    let digest = sha(&serde_json::to_vec(meta).expect("metadata serializes"));
    let safe: String = meta
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("{safe}-{}-{}", meta.seq, &digest[..16])
}

/// The metadata, without any check: for `sign` and `bundle verify`'s report.
fn read_meta_unverified(bundle: &[u8]) -> Result<Metadata, String> {
    unpack(bundle).map(|(m, _)| m)
}

/// Reads the tar: `bundle.json` first, then only the files it lists, each
/// once, a regular file, with the SHA-256 it gives.
fn unpack(bundle: &[u8]) -> Result<(Metadata, BTreeMap<String, Vec<u8>>), String> {
    let mut archive = tar::Archive::new(Cursor::new(bundle));
    let entries = archive.entries().map_err(|e| e.to_string())?;
    let mut meta: Option<Metadata> = None;
    let mut files = BTreeMap::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("unreadable tar: {e}"))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err("holds something other than regular files".into());
        }
        let name = entry
            .path()
            .map_err(|e| e.to_string())?
            .to_string_lossy()
            .into_owned();
        let size = entry.header().size().map_err(|e| e.to_string())?;
        if size > bundle.len() as u64 {
            return Err(format!("{name}: size {size} beyond the bundle"));
        }
        let mut data = Vec::with_capacity(size as usize);
        entry
            .read_to_end(&mut data)
            .map_err(|e| format!("{name}: {e}"))?;
        match &meta {
            None if name == META => {
                let m: Metadata =
                    serde_json::from_slice(&data).map_err(|e| format!("{META}: {e}"))?;
                if m.format != FORMAT {
                    return Err(format!(
                        "format {} (this edgeinfer reads {FORMAT})",
                        m.format
                    ));
                }
                meta = Some(m);
            }
            None => return Err(format!("{META} must come first, found {name}")),
            Some(m) => {
                let expected = if name == MODEL {
                    Some(&m.sha256)
                } else {
                    m.files.get(&name)
                };
                let expected = expected.ok_or_else(|| format!("{name} is not listed in {META}"))?;
                if &sha(&data) != expected {
                    return Err(format!("{name}: SHA-256 differs from {META}"));
                }
                if files.insert(name.clone(), data).is_some() {
                    return Err(format!("{name} appears twice"));
                }
            }
        }
    }
    let meta = meta.ok_or(format!("no {META}"))?;
    for name in std::iter::once(MODEL).chain(meta.files.keys().map(String::as_str)) {
        if !files.contains_key(name) {
            return Err(format!("{name} is listed but missing"));
        }
    }
    if !files.contains_key(MANIFEST) {
        return Err(format!("no {MANIFEST}"));
    }
    if files[MODEL].len() as u64 != meta.size {
        return Err(format!("{MODEL}: size differs from {META}"));
    }
    Ok((meta, files))
}

/// Parses a date `YYYY-MM-DD` (UTC midnight) or unix seconds.
pub fn parse_time(text: &str) -> Result<u64, String> {
    if let Ok(s) = text.parse::<u64>() {
        return Ok(s);
    }
    let parts: Vec<&str> = text.split('-').collect();
    let bad = || format!("{text:?} is neither YYYY-MM-DD nor unix seconds");
    let [y, m, d] = parts[..] else {
        return Err(bad());
    };
    let (y, m, d): (i64, i64, i64) = (
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        d.parse().map_err(|_| bad())?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days as u64 * 86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    fn bundle(seq: u64, not_after: u64) -> Vec<u8> {
        create(CreateArgs {
            model: &repo().join("models/motion.toml"),
            version: "2.0".into(),
            seq,
            not_after,
            reference: None,
        })
        .unwrap()
    }

    #[test]
    fn dates_are_utc_midnight() {
        assert_eq!(parse_time("1970-01-01").unwrap(), 0);
        assert_eq!(parse_time("2027-01-01").unwrap(), 1_798_761_600);
        assert_eq!(parse_time("1800000000").unwrap(), 1_800_000_000);
        assert!(parse_time("2027-13-01").is_err());
    }

    #[test]
    fn a_signed_bundle_verifies_and_any_change_is_refused() {
        let (public, secret) = keygen().unwrap();
        let pk = public_key(&public).unwrap();
        let b = bundle(3, now_s() + 3600);
        let sig = sign(&b, &secret, None).unwrap();
        let v = verify(&b, &sig, std::slice::from_ref(&pk), now_s()).unwrap();
        assert_eq!((v.meta.name.as_str(), v.meta.seq), ("motion", 3));
        assert_eq!(sha(&v.model), v.meta.sha256);
        let manifest = String::from_utf8(v.manifest).unwrap();
        assert!(manifest.contains("file = \"model.onnx\""), "{manifest}");

        // One byte changed anywhere: the signature no longer holds.
        let mut tampered = b.clone();
        let at = tampered.len() / 2;
        tampered[at] ^= 1;
        let e = verify(&tampered, &sig, std::slice::from_ref(&pk), now_s()).unwrap_err();
        assert!(matches!(e, BundleError::Signature(_)), "{e}");

        // Another key's signature.
        let (other, _) = keygen().unwrap();
        let e = verify(&b, &sig, &[public_key(&other).unwrap()], now_s()).unwrap_err();
        assert!(matches!(e, BundleError::Signature(_)), "{e}");

        // Expired.
        let old = bundle(4, now_s() - 1);
        let sig = sign(&old, &secret, None).unwrap();
        let e = verify(&old, &sig, &[pk], now_s()).unwrap_err();
        assert!(matches!(e, BundleError::Expired { .. }), "{e}");
    }
}
