//! The verified certificate of a TLS client, for handlers.

use std::fmt;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;

/// The certificate a client showed on a [mTLS listener](super::TlsConfig::client_ca),
/// verified against the listener's client CAs.
///
/// Every request of such a connection carries it in its extensions; in axum:
///
/// ```
/// use axum::Extension;
/// use micro_core::tls::PeerCertificate;
///
/// async fn whoami(Extension(peer): Extension<PeerCertificate>) -> String {
///     peer.common_name().unwrap_or("anonymous").to_owned()
/// }
/// ```
///
/// A request without it came over plain TCP, or from a client that showed no certificate
/// to a listener where they are [optional](super::ClientAuth::Optional). Identity from
/// it is only as good as the CA bundle: trust the names of a certificate because the CA
/// issued them, and prefer the SAN names ([`dns_names`](Self::dns_names),
/// [`uri_names`](Self::uri_names), such as a SPIFFE id) over the subject's common name.
/// Cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    inner: Arc<Inner>,
}

#[derive(PartialEq, Eq)]
struct Inner {
    common_name: Option<String>,
    dns_names: Vec<String>,
    uri_names: Vec<String>,
    serial: Vec<u8>,
    chain: Vec<CertificateDer<'static>>,
}

impl PeerCertificate {
    /// Reads the names of the leaf of a verified chain; `None` for an empty chain or a
    /// leaf that does not parse (which a verified chain never has).
    pub(crate) fn from_chain(chain: &[CertificateDer<'static>]) -> Option<Self> {
        let leaf = chain.first()?;
        let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
        let inner = Inner {
            common_name: common_name(cert.subject()),
            dns_names: cert.valid_dns_names().map(str::to_owned).collect(),
            uri_names: cert.valid_uri_names().map(str::to_owned).collect(),
            serial: cert.serial().to_vec(),
            chain: chain.to_vec(),
        };
        Some(Self {
            inner: Arc::new(inner),
        })
    }

    /// The subject's common name (`CN`), when it has one.
    pub fn common_name(&self) -> Option<&str> {
        self.inner.common_name.as_deref()
    }

    /// The DNS names of the subject alternative names.
    pub fn dns_names(&self) -> &[String] {
        &self.inner.dns_names
    }

    /// The URIs of the subject alternative names (a SPIFFE id such as
    /// `spiffe://shop.internal/orders`).
    pub fn uri_names(&self) -> &[String] {
        &self.inner.uri_names
    }

    /// The serial number, big-endian, as in the certificate.
    pub fn serial(&self) -> &[u8] {
        &self.inner.serial
    }

    /// The serial number in lowercase hexadecimal, as `openssl x509 -serial` prints it
    /// (without the leading zero byte DER may add).
    pub fn serial_hex(&self) -> String {
        let serial = match self.inner.serial.as_slice() {
            [0, rest @ ..] if !rest.is_empty() => rest,
            serial => serial,
        };
        serial.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// The DER of the leaf certificate, to read with an X.509 parser of your choice.
    pub fn der(&self) -> &[u8] {
        self.inner.chain[0].as_ref()
    }

    /// The whole chain the client sent, the leaf first, as DER.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.inner.chain
    }
}

impl fmt::Debug for PeerCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerCertificate")
            .field("common_name", &self.inner.common_name)
            .field("dns_names", &self.inner.dns_names)
            .field("uri_names", &self.inner.uri_names)
            .field("serial", &self.serial_hex())
            .finish_non_exhaustive()
    }
}

/// One DER element: its tag, its contents and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, rest) = rest.split_at(count);
        let len = bytes
            .iter()
            .fold(0usize, |len, &byte| (len << 8) | usize::from(byte));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
/// 2.5.4.3, `commonName`.
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// The last common name of a DER `Name` (the contents of its outer `SEQUENCE`), as
/// X.509 puts the most specific one last.
fn common_name(mut name: &[u8]) -> Option<String> {
    let mut found = None;
    while !name.is_empty() {
        let (tag, mut set, rest) = element(name)?;
        name = rest;
        if tag != SET {
            return None;
        }
        while !set.is_empty() {
            let (tag, attribute, rest) = element(set)?;
            set = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = element(attribute)?;
            if tag == OID && oid == COMMON_NAME {
                let (tag, text, _) = element(value)?;
                found = string(tag, text).or(found);
            }
        }
    }
    found
}

fn string(tag: u8, text: &[u8]) -> Option<String> {
    const UTF8_STRING: u8 = 0x0c;
    const PRINTABLE_STRING: u8 = 0x13;
    const IA5_STRING: u8 = 0x16;
    const BMP_STRING: u8 = 0x1e;
    match tag {
        UTF8_STRING | PRINTABLE_STRING | IA5_STRING => {
            std::str::from_utf8(text).ok().map(str::to_owned)
        }
        BMP_STRING if text.len().is_multiple_of(2) => {
            let units = text
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_names_of_a_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["orders.internal".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "shop");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "orders-service");
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://shop.internal/orders".try_into().unwrap(),
        ));
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x8a, 0x01]));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let peer = PeerCertificate::from_chain(&[cert.der().clone()]).unwrap();
        assert_eq!(peer.common_name(), Some("orders-service"));
        assert_eq!(peer.dns_names(), ["orders.internal"]);
        assert_eq!(peer.uri_names(), ["spiffe://shop.internal/orders"]);
        assert_eq!(peer.serial_hex(), "8a01");
        assert_eq!(peer.der(), cert.der().as_ref());
    }

    #[test]
    fn a_name_without_a_common_name_has_none() {
        let params = rcgen::CertificateParams::new(vec!["a.example".to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = params;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = params.self_signed(&key).unwrap();
        let peer = PeerCertificate::from_chain(&[cert.der().clone()]).unwrap();
        assert_eq!(peer.common_name(), None);
    }

    #[test]
    fn malformed_names_are_not_read() {
        assert_eq!(common_name(&[SET, 0x05, SEQUENCE]), None);
        assert_eq!(common_name(&[SET, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(common_name(&[]), None);
    }
}
