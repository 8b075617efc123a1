//! The host link: how a gateway and an agent prove themselves to each other
//! before the gateway's HTTP request reaches a session's Jupyter server.
//!
//! Each host has one link port. A connection to it starts with a short
//! handshake, then carries plain HTTP/1.1 to the session's Unix socket:
//!
//! ```text
//! gateway → host   OCLINK/1 <host id> <sid> <gateway nonce>\n
//! host → gateway   OCLINK/1 <host nonce> <host proof>\n
//! gateway → host   <gateway proof>\n            (the HTTP request follows at once)
//! ```
//!
//! Both proofs are HMAC-SHA256 under the host's link key, a random key
//! control issues per host (never the HostKey), over a role, the host id,
//! the sid and both nonces. So a peer that does not hold that host's key
//! cannot answer (pointing the gateway at another service yields nothing),
//! a recorded handshake cannot be replayed (the other side's nonce is new),
//! and one host's key is worthless for another host or role.
//!
//! A plain `GET /healthz` on the same port answers `ok` (the gateway's
//! reachability probe). Pure functions only: the gateway and the agent do
//! the I/O.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::sid::is_valid_sid;

/// The first word of every link handshake line.
pub const MAGIC: &str = "OCLINK/1";
/// No handshake line is longer (the gateway's is the longest: about 110).
pub const MAX_LINE: usize = 256;
/// Random bytes in a nonce (hex-encoded on the wire).
const NONCE_BYTES: usize = 16;
/// Random bytes in a link key.
const KEY_BYTES: usize = 32;
/// What the gateway's health probe sends first; any other non-handshake
/// opening is refused.
pub const HEALTH_REQUEST_LINE: &str = "GET /healthz HTTP/1.1";

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
mod tests {
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
