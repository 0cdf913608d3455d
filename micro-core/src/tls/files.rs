//! Reading certificates and keys from PEM files, with errors that name the setting.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::BoxError;

/// A TLS setting that can't be used: a file that is missing or holds no usable PEM, a key
/// that does not match its certificate, a combination of settings that makes no sense.
///
/// It names the setting ([`key`](Self::key), such as `tls.cert`) and the file
/// ([`path`](Self::path)); the underlying error is the [`source`](std::error::Error::source).
#[derive(Debug)]
pub struct TlsError {
    key: &'static str,
    path: Option<PathBuf>,
    reason: Cow<'static, str>,
    source: Option<BoxError>,
}

impl TlsError {
    pub(crate) fn new(key: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            key,
            path: None,
            reason: reason.into(),
            source: None,
        }
    }

    pub(crate) fn at(mut self, path: &Path) -> Self {
        self.path = Some(path.to_owned());
        self
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The setting, as it is spelled in configuration (`tls.key`, `tls.client_ca`).
    pub fn key(&self) -> &str {
        self.key
    }

    /// The file the setting names, when the error is about a file.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tls setting `{}`", self.key)?;
        if let Some(path) = &self.path {
            write!(f, " ({})", path.display())?;
        }
        write!(f, " {}", self.reason)
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

fn read(path: &Path, key: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| {
        TlsError::new(key, "can't be read")
            .at(path)
            .with_source(source)
    })
}

/// Every certificate of the PEM file at `path`, in order; at least one.
pub(crate) fn certs(
    path: &Path,
    key: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, key)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| {
            TlsError::new(key, "holds malformed PEM")
                .at(path)
                .with_source(source)
        })?;
    if certs.is_empty() {
        return Err(TlsError::new(key, "holds no PEM certificate").at(path));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) of the PEM file at `path`.
pub(crate) fn private_key(
    path: &Path,
    key: &'static str,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path, key)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => {
            TlsError::new(key, "holds no PEM private key").at(path)
        }
        source => TlsError::new(key, "holds malformed PEM")
            .at(path)
            .with_source(source),
    })
}

/// A root store of every certificate in the PEM bundle at `path`; at least one must be
/// usable as a trust anchor.
pub(crate) fn roots(path: &Path, key: &'static str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(path, key)? {
        roots.add(cert).map_err(|source| {
            TlsError::new(key, "holds a certificate that can't be a trust anchor")
                .at(path)
                .with_source(source)
        })?;
    }
    Ok(roots)
}
