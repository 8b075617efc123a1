//! The host link: how a gateway and an agent know each other before the
//! gateway's HTTP request reaches a session's Jupyter server.
//!
//! Each host has one link port, and every connection to it is mutual TLS
//! (1.3) under control's **host CA**:
//!
//! * The host presents a certificate control issued to it at registration,
//!   naming [`host_name`] and [`host_wildcard`] (EKU serverAuth only). The
//!   gateway asks for [`session_server_name`] (`{sid}.h{id}.hosts.…`), so
//!   hostname verification accepts only a certificate naming that host id,
//!   and it also requires the exact leaf fingerprint the route table carries
//!   ([`CertFingerprint`]), so a rotated or revoked certificate stops
//!   working at once even while it is valid.
//! * The gateway presents a client certificate naming [`GATEWAY_NAME`] (EKU
//!   clientAuth only); the agent accepts no other, so a host's own
//!   certificate is no key to another host.
//! * The agent reads the sid from the SNI and splices the connection to that
//!   session's socket.
//!
//! Both ends make their own key pair ([`new_private_key`]) and send control
//! a request ([`certificate_request`]); control ignores the names in it and
//! decides them itself. Private keys never leave the machine that made them.
//!
//! A plain `GET /healthz` on the same port answers `ok` (the gateways'
//! reachability probe), told apart from TLS by its first byte. No I/O here:
//! the gateway and the agent do it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::sid::is_valid_sid;

/// The domain under which every host is named; never resolved, only
/// matched in certificates.
pub const HOSTS_DOMAIN: &str = "hosts.opencloud.internal";
/// The one name a gateway's client certificate carries.
pub const GATEWAY_NAME: &str = "gateway.opencloud.internal";
/// What the gateways' health probe sends first; any other plaintext opening
/// is refused.
pub const HEALTH_REQUEST_LINE: &str = "GET /healthz HTTP/1.1";
/// A TLS record carrying a handshake starts with this byte; nothing else
/// the link answers does.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;
/// No plaintext line the link reads is longer.
pub const MAX_LINE: usize = 256;

/// Host `id`'s own name, `h{id}.hosts.opencloud.internal`.
pub fn host_name(id: u64) -> String {
    format!("h{id}.{HOSTS_DOMAIN}")
}

/// The names of host `id`'s sessions, `*.h{id}.hosts.opencloud.internal`.
pub fn host_wildcard(id: u64) -> String {
    format!("*.{}", host_name(id))
}

/// What the gateway asks for (SNI) to reach session `sid` on host `host`.
pub fn session_server_name(sid: &str, host: u64) -> String {
    format!("{sid}.h{host}.{HOSTS_DOMAIN}")
}

/// The (sid, host id) a [`session_server_name`] names; `None` for any
/// other name.
pub fn parse_session_server_name(name: &str) -> Option<(&str, u64)> {
    let rest = name.strip_suffix(HOSTS_DOMAIN)?.strip_suffix('.')?;
    let (sid, host) = rest.split_once('.')?;
    let digits = host.strip_prefix('h')?;
    // One spelling per id: no sign, no leading zero.
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    let host = digits.parse().ok()?;
    is_valid_sid(sid).then_some((sid, host))
}

/// Why a key or a certificate request could not be made.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

/// A new ECDSA P-256 key pair for one end of the link, as PKCS#8 PEM.
pub fn new_private_key() -> Result<String, KeyError> {
    rcgen::KeyPair::generate()
        .map(|key| key.serialize_pem())
        .map_err(|e| KeyError(format!("cannot make a key pair: {e}")))
}

/// A certificate signing request (PEM) for the key in `key_pem`. It names
/// nothing: control decides what the certificate names.
pub fn certificate_request(key_pem: &str) -> Result<String, KeyError> {
    let key = rcgen::KeyPair::from_pem(key_pem)
        .map_err(|e| KeyError(format!("not a private key in PEM: {e}")))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| KeyError(format!("cannot make a certificate request: {e}")))
}

/// A certificate control issued for one end of the link, with the CA that
/// signed it (the only one the other end trusts).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkCertificate {
    /// The leaf, PEM.
    pub certificate: String,
    /// Control's host CA, PEM.
    pub ca: String,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub not_after: u64,
}

impl LinkCertificate {
    /// When to ask for the next one: with a third of its life left, so a
    /// control outage of days does not let it run out.
    pub fn renew_at(&self) -> u64 {
        self.not_after - self.not_after.saturating_sub(self.not_before) / 3
    }
}

impl std::fmt::Debug for LinkCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkCertificate")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// `POST` body asking control for a link certificate: agents on
/// [`paths::agent::LINK_CERTIFICATE`](crate::paths::agent::LINK_CERTIFICATE),
/// gateways on [`paths::internal::LINK_CERTIFICATE`](crate::paths::internal::LINK_CERTIFICATE).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRequest {
    /// PEM, from [`certificate_request`].
    pub csr: String,
}

impl std::fmt::Debug for CertificateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertificateRequest(…)")
    }
}

/// The SHA-256 of a certificate's DER: the route table pins each host's
/// current leaf by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CertFingerprint([u8; 32]);

impl CertFingerprint {
    /// The fingerprint of the certificate `der`.
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// Accepts 64 lowercase hex characters, the form [`Display`](std::fmt::Display) writes.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.as_bytes();
        if text.len() != 64 {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl std::fmt::Display for CertFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for CertFingerprint {
    // Not a secret; the first bytes are enough to tell two apart in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, ..] = self.0;
        write!(f, "CertFingerprint({a:02x}{b:02x}{c:02x}{d:02x}…)")
    }
}

impl TryFrom<String> for CertFingerprint {
    type Error = &'static str;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::parse(&text).ok_or("a certificate fingerprint is 64 lowercase hex characters")
    }
}

impl From<CertFingerprint> for String {
    fn from(fingerprint: CertFingerprint) -> Self {
        fingerprint.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SID: &str = "abcdefghijklmnopqrstuvwxyz";

    #[test]
    fn a_session_server_name_names_its_sid_and_host_and_nothing_else_parses() {
        let name = session_server_name(SID, 42);
        assert_eq!(name, format!("{SID}.h42.hosts.opencloud.internal"));
        assert_eq!(parse_session_server_name(&name), Some((SID, 42)));
        assert_eq!(
            parse_session_server_name(&session_server_name(SID, u64::MAX)),
            Some((SID, u64::MAX))
        );
        for bad in [
            host_name(42),
            format!("{SID}.h042.{HOSTS_DOMAIN}"),
            format!("{SID}.h.{HOSTS_DOMAIN}"),
            format!("{SID}.h+4.{HOSTS_DOMAIN}"),
            format!("{SID}.42.{HOSTS_DOMAIN}"),
            format!("x.{SID}.h42.{HOSTS_DOMAIN}"),
            format!("../etc.h42.{HOSTS_DOMAIN}"),
            format!("{SID}.h42.hosts.example.com"),
            format!("{SID}.h42{HOSTS_DOMAIN}"),
            format!("{SID}.h99999999999999999999.{HOSTS_DOMAIN}"),
            GATEWAY_NAME.to_owned(),
        ] {
            assert_eq!(parse_session_server_name(&bad), None, "{bad}");
        }
    }

    #[test]
    fn a_hosts_wildcard_covers_its_session_names_only() {
        assert_eq!(host_wildcard(7), "*.h7.hosts.opencloud.internal");
        let wildcard = host_wildcard(7);
        let suffix = wildcard.trim_start_matches('*');
        assert!(session_server_name(SID, 7).ends_with(suffix));
        assert!(!session_server_name(SID, 70).ends_with(suffix));
    }

    #[test]
    fn a_request_carries_the_key_it_was_made_with() {
        let key = new_private_key().unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        let csr = certificate_request(&key).unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert!(certificate_request("not a key").is_err());
        assert_ne!(new_private_key().unwrap(), key, "every key is new");
    }

    #[test]
    fn fingerprints_round_trip_in_lowercase_hex_only() {
        let fingerprint = CertFingerprint::of(b"a certificate");
        let text = fingerprint.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(CertFingerprint::parse(&text), Some(fingerprint));
        assert_eq!(CertFingerprint::parse(&text.to_uppercase()), None);
        assert_eq!(CertFingerprint::parse(&text[..62]), None);
        assert_eq!(CertFingerprint::parse(&format!("{}zz", &text[..62])), None);
        let json = serde_json::to_string(&fingerprint).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(
            serde_json::from_str::<CertFingerprint>(&json).unwrap(),
            fingerprint
        );
        assert!(format!("{fingerprint:?}").len() < 30);
    }

    #[test]
    fn a_certificate_is_renewed_with_a_third_of_its_life_left() {
        let certificate = LinkCertificate {
            certificate: String::new(),
            ca: String::new(),
            not_before: 1_000,
            not_after: 1_000 + 30 * 86_400,
        };
        assert_eq!(certificate.renew_at(), 1_000 + 20 * 86_400);
    }
}
