//! TLS to the broker: rustls with the ring provider (no cmake or C++
//! toolchain needed, which keeps ARM cross builds simple).

use crate::config::Config;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::Arc;

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(path, what)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read_pem(path, "broker.key_file")?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("broker.key_file {}: {e}", path.display()))?
        .ok_or_else(|| {
            format!(
                "broker.key_file {}: no PEM private key in it",
                path.display()
            )
        })
}

/// The rustls client configuration for an `mqtts://` broker: roots from
/// `broker.ca_file` (else the system store), and a client certificate when
/// `cert_file`/`key_file` are set. Errors name the key and the file.
pub fn client_config(config: &Config) -> Result<ClientConfig, String> {
    let b = &config.broker;
    let mut roots = RootCertStore::empty();
    match &b.ca_file {
        Some(file) => {
            for cert in certificates(&config.base_dir.join(file), "broker.ca_file")? {
                roots
                    .add(cert)
                    .map_err(|e| format!("broker.ca_file {}: {e}", file.display()))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(
                    "mqtts:// without broker.ca_file, and no system CA certificates were found"
                        .into(),
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots);
    match (&b.cert_file, &b.key_file) {
        (Some(cert), Some(key)) => {
            let chain = certificates(&config.base_dir.join(cert), "broker.cert_file")?;
            let key = private_key(&config.base_dir.join(key))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("broker.cert_file/key_file: {e}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}
