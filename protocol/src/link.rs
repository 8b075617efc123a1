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
//!
//! Until the gateway and the agent switch to it, the link still runs the
//! HMAC handshake at the end of this module (`OCLINK/1`, [`LinkKey`]).

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

// The HMAC handshake the link runs until the switch to mutual TLS.

use hmac::{Hmac, Mac};
use rand::RngCore;

/// The first word of every link handshake line.
pub const MAGIC: &str = "OCLINK/1";
/// Random bytes in a nonce (hex-encoded on the wire).
const NONCE_BYTES: usize = 16;
/// Random bytes in a link key.
const KEY_BYTES: usize = 32;

/// A host's link key: 64 hex characters. Never printed.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LinkKey(String);

impl TryFrom<String> for LinkKey {
    type Error = &'static str;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::parse(&text).ok_or("a link key is 64 lowercase hex characters")
    }
}

impl From<LinkKey> for String {
    fn from(key: LinkKey) -> Self {
        key.0
    }
}

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(…)")
    }
}

impl LinkKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_BYTES];
        rand::thread_rng().fill_bytes(&mut bytes);
        Self(hex(&bytes))
    }

    /// Accepts exactly what [`LinkKey::generate`] makes.
    pub fn parse(text: &str) -> Option<Self> {
        is_hex(text, KEY_BYTES).then(|| Self(text.to_owned()))
    }

    /// The wire and storage form.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn mac(&self, role: &str, host: u64, sid: &str, gateway: &Nonce, host_nonce: &Nonce) -> String {
        let mut mac = <Hmac<Sha256>>::new_from_slice(self.0.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        for part in [
            role.as_bytes(),
            host.to_string().as_bytes(),
            sid.as_bytes(),
            gateway.0.as_bytes(),
            host_nonce.0.as_bytes(),
        ] {
            mac.update(part);
            mac.update(b"|");
        }
        hex(&mac.finalize().into_bytes())
    }
}

/// A handshake nonce, hex-encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nonce(String);

impl Nonce {
    pub fn generate() -> Self {
        let mut bytes = [0u8; NONCE_BYTES];
        rand::thread_rng().fill_bytes(&mut bytes);
        Self(hex(&bytes))
    }

    fn parse(text: &str) -> Option<Self> {
        is_hex(text, NONCE_BYTES).then(|| Self(text.to_owned()))
    }
}

/// What the gateway sends first: which host it means and which session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub host: u64,
    pub sid: String,
    pub nonce: Nonce,
}

/// What a host answers: its nonce and its proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub nonce: Nonce,
    proof: String,
}

/// Why a handshake line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("not an OpenCloud link handshake")]
    NotALink,
    #[error("malformed handshake line")]
    Malformed,
    #[error("the peer could not prove it holds the link key")]
    BadProof,
}

impl Hello {
    pub fn new(host: u64, sid: &str) -> Self {
        Self {
            host,
            sid: sid.to_owned(),
            nonce: Nonce::generate(),
        }
    }

    /// The line, newline included.
    pub fn encode(&self) -> String {
        format!("{MAGIC} {} {} {}\n", self.host, self.sid, self.nonce.0)
    }

    /// Parses the gateway's line (without its newline).
    pub fn parse(line: &str) -> Result<Self, LinkError> {
        let mut words = line.split(' ');
        if words.next() != Some(MAGIC) {
            return Err(LinkError::NotALink);
        }
        let (Some(host), Some(sid), Some(nonce), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(LinkError::Malformed);
        };
        let host = host.parse().map_err(|_| LinkError::Malformed)?;
        if !is_valid_sid(sid) {
            return Err(LinkError::Malformed);
        }
        Ok(Self {
            host,
            sid: sid.to_owned(),
            nonce: Nonce::parse(nonce).ok_or(LinkError::Malformed)?,
        })
    }

    /// The host's answer to this hello, with a fresh nonce.
    pub fn answer(&self, key: &LinkKey) -> Answer {
        let nonce = Nonce::generate();
        let proof = key.mac("host", self.host, &self.sid, &self.nonce, &nonce);
        Answer { nonce, proof }
    }

    /// Checks the host's answer line (without its newline); on success
    /// returns the gateway's proof line, newline included.
    pub fn check_answer(&self, key: &LinkKey, line: &str) -> Result<String, LinkError> {
        let answer = Answer::parse(line)?;
        let expected = key.mac("host", self.host, &self.sid, &self.nonce, &answer.nonce);
        if !same(&expected, &answer.proof) {
            return Err(LinkError::BadProof);
        }
        let proof = key.mac("gateway", self.host, &self.sid, &self.nonce, &answer.nonce);
        Ok(format!("{proof}\n"))
    }

    /// Checks the gateway's proof line (without its newline), as the host.
    pub fn check_gateway_proof(
        &self,
        key: &LinkKey,
        answer: &Answer,
        line: &str,
    ) -> Result<(), LinkError> {
        let expected = key.mac("gateway", self.host, &self.sid, &self.nonce, &answer.nonce);
        if same(&expected, line) {
            Ok(())
        } else {
            Err(LinkError::BadProof)
        }
    }
}

impl Answer {
    /// The line, newline included.
    pub fn encode(&self) -> String {
        format!("{MAGIC} {} {}\n", self.nonce.0, self.proof)
    }

    fn parse(line: &str) -> Result<Self, LinkError> {
        let mut words = line.split(' ');
        if words.next() != Some(MAGIC) {
            return Err(LinkError::NotALink);
        }
        let (Some(nonce), Some(proof), None) = (words.next(), words.next(), words.next()) else {
            return Err(LinkError::Malformed);
        };
        if !is_hex(proof, 32) {
            return Err(LinkError::Malformed);
        }
        Ok(Self {
            nonce: Nonce::parse(nonce).ok_or(LinkError::Malformed)?,
            proof: proof.to_owned(),
        })
    }
}

/// Constant-time comparison of two proofs.
fn same(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_hex(text: &str, bytes: usize) -> bool {
    text.len() == bytes * 2 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod handshake_tests {
    use super::*;

    const SID: &str = "abcdefghijklmnopqrstuvwxyz";

    /// Runs the handshake between the two roles with the given keys.
    fn handshake(gateway_key: &LinkKey, host_key: &LinkKey) -> Result<(), LinkError> {
        let hello = Hello::new(7, SID);
        let received = Hello::parse(hello.encode().trim_end())?;
        let answer = received.answer(host_key);
        let proof = hello.check_answer(gateway_key, answer.encode().trim_end())?;
        received.check_gateway_proof(host_key, &answer, proof.trim_end())
    }

    #[test]
    fn both_sides_with_the_same_key_agree() {
        let key = LinkKey::generate();
        handshake(&key, &key).unwrap();
    }

    #[test]
    fn a_host_without_the_key_is_refused_by_the_gateway() {
        let err = handshake(&LinkKey::generate(), &LinkKey::generate()).unwrap_err();
        assert_eq!(err, LinkError::BadProof);
    }

    #[test]
    fn a_gateway_without_the_key_is_refused_by_the_host() {
        let key = LinkKey::generate();
        let hello = Hello::new(7, SID);
        let answer = hello.answer(&key);
        let forged = Hello::new(7, SID)
            .check_answer(&key, answer.encode().trim_end())
            .unwrap_or_else(|_| "0".repeat(64));
        assert_eq!(
            hello.check_gateway_proof(&key, &answer, forged.trim_end()),
            Err(LinkError::BadProof)
        );
        // Replaying the host's own proof as the gateway's fails too.
        assert_eq!(
            hello.check_gateway_proof(&key, &answer, &answer.proof),
            Err(LinkError::BadProof)
        );
    }

    #[test]
    fn a_proof_is_bound_to_host_and_session() {
        let key = LinkKey::generate();
        let hello = Hello::new(7, SID);
        let answer = hello.answer(&key);
        let other_host = Hello {
            host: 8,
            ..hello.clone()
        };
        assert_eq!(
            other_host.check_answer(&key, answer.encode().trim_end()),
            Err(LinkError::BadProof)
        );
        let other_sid = Hello {
            sid: "bbcdefghijklmnopqrstuvwxyz".into(),
            ..hello
        };
        assert_eq!(
            other_sid.check_answer(&key, answer.encode().trim_end()),
            Err(LinkError::BadProof)
        );
    }

    #[test]
    fn other_protocols_and_bad_lines_are_named() {
        assert_eq!(Hello::parse("GET / HTTP/1.1"), Err(LinkError::NotALink));
        assert_eq!(Hello::parse("HTTP/1.1 200 OK"), Err(LinkError::NotALink));
        for bad in [
            "OCLINK/1",
            "OCLINK/1 7",
            &format!("OCLINK/1 x {SID} {}", "0".repeat(32)),
            &format!("OCLINK/1 7 ../etc {}", "0".repeat(32)),
            &format!("OCLINK/1 7 {SID} short"),
            &format!("OCLINK/1 7 {SID} {} extra", "0".repeat(32)),
        ] {
            assert_eq!(Hello::parse(bad), Err(LinkError::Malformed), "{bad}");
        }
        let hello = Hello::new(7, SID);
        let key = LinkKey::generate();
        assert_eq!(
            hello.check_answer(&key, "HTTP/1.1 200 OK"),
            Err(LinkError::NotALink)
        );
        assert_eq!(
            hello.check_answer(&key, "OCLINK/1 zz zz"),
            Err(LinkError::Malformed)
        );
        assert!(Hello::new(u64::MAX, SID).encode().len() < MAX_LINE);
    }

    #[test]
    fn keys_parse_only_in_their_own_form_and_never_print() {
        let key = LinkKey::generate();
        assert_eq!(LinkKey::parse(key.expose()), Some(key.clone()));
        assert_eq!(LinkKey::parse("short"), None);
        assert_eq!(LinkKey::parse(&key.expose().to_uppercase()), None);
        assert!(!format!("{key:?}").contains(key.expose()));
    }
}
