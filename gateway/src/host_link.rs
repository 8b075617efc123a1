//! The gateway's end of the host link (see `opencloud_protocol::link`). A
//! session request goes to its host's link port over TLS: Pingora's rustls
//! connector asks for `{sid}.h{host}.hosts.opencloud.internal` with hostname
//! verification on, trusting control's host CA alone, and presents this
//! gateway's client certificate (`link_certificate`). So only a certificate
//! naming that host id, unexpired and from the host CA, completes the
//! handshake. [`check_pin`] then requires the exact leaf the route table
//! pins for the host, on new and pooled connections alike, before a byte of
//! the request leaves: a rotated or revoked certificate stops working the
//! moment the table says so, valid or not.

use opencloud_protocol::link::{session_server_name, CertFingerprint};
use pingora::prelude::HttpPeer;
use pingora::protocols::Digest;
use pingora::{Error, ErrorType, Result};

use crate::link_certificate::LinkCredentials;
use crate::table::{HostLink, SessionKey};

/// The peer for session `sid` (as the request spelled it, and decoded) on
/// host `host` through `link`.
pub fn peer(
    link: &HostLink,
    host: u64,
    (sid, key): (&str, SessionKey),
    credentials: &LinkCredentials,
) -> HttpPeer {
    let mut peer = HttpPeer::new(link.addr, true, session_server_name(sid, host));
    // A link connection carries one session to one pinned certificate: pool
    // them per sid and pin (Pingora's own pool key adds the SNI and the
    // client certificate), so a new pin never reuses an old connection.
    peer.group_key = key.pool_group() ^ link.pool_tag;
    peer.options.ca = Some(credentials.ca.clone());
    peer.client_cert_key = Some(credentials.client.clone());
    peer
}

/// Refuses a connection whose host did not present the pinned leaf.
pub fn check_pin(digest: Option<&Digest>, pinned: &CertFingerprint) -> Result<()> {
    let presented = digest
        .and_then(|d| d.ssl_digest.as_ref())
        .map(|tls| tls.cert_digest.as_slice());
    if presented == Some(&pinned.as_bytes()[..]) {
        return Ok(());
    }
    refused("not_pinned");
    Error::e_explain(
        ErrorType::HandshakeError,
        "the host presented a certificate control no longer vouches for",
    )
}

/// Counts a link the gateway would not use, by why.
pub fn refused(reason: &'static str) {
    metrics::counter!("opencloud_gateway_host_link_refusals_total", "reason" => reason)
        .increment(1);
}

/// Why a TLS handshake with a host failed, as a label: Pingora passes on
/// rustls's message, which names the certificate problem (in words for
/// the errors with context, by variant name for the others).
pub fn handshake_refusal(error: &Error) -> &'static str {
    const KNOWN: [(&[&str], &str); 5] = [
        (&["not valid for name", "NotValidForName"], "wrong_host"),
        (&["certificate expired", "Expired"], "expired"),
        (&["not valid yet", "NotValidYet"], "not_yet_valid"),
        (&["UnknownIssuer", "BadSignature"], "unknown_ca"),
        (&["extended key usage", "InvalidPurpose"], "wrong_usage"),
    ];
    let text = error.to_string();
    KNOWN
        .iter()
        .find(|(needles, _)| needles.iter().any(|n| text.contains(n)))
        .map_or("handshake", |(_, label)| label)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use pingora::protocols::tls::SslDigest;
    use std::sync::Arc;

    fn digest_presenting(leaf: &[u8]) -> Digest {
        Digest {
            ssl_digest: Some(Arc::new(SslDigest::new(
                "TLS13_AES_128_GCM_SHA256",
                "TLSv1.3",
                None,
                None,
                CertFingerprint::of(leaf).as_bytes().to_vec(),
            ))),
            ..Digest::default()
        }
    }

    #[test]
    fn a_peer_asks_for_its_session_on_its_host_with_the_gateways_credentials() {
        use crate::link_certificate::tests::issued_for;
        use crate::link_certificate::LinkCredentials;
        use pingora::upstreams::peer::Peer;
        let key = opencloud_protocol::link::new_private_key().unwrap();
        let credentials = LinkCredentials::new(&issued_for(&key), &key).unwrap();
        let sid = &opencloud_protocol::routes::new_sid();
        let link = |pin: &[u8]| {
            let pinned = CertFingerprint::of(pin);
            HostLink {
                addr: "127.0.0.1:7000".parse().unwrap(),
                pool_tag: u64::from_le_bytes(pinned.as_bytes()[..8].try_into().unwrap()),
                pinned,
            }
        };
        let key_of = |s: &str| SessionKey::parse(s).unwrap();
        let one = peer(&link(b"a"), 7, (sid, key_of(sid)), &credentials);
        assert!(one.is_tls());
        assert_eq!(one.sni(), format!("{sid}.h7.hosts.opencloud.internal"));
        assert!(one.verify_cert() && one.verify_hostname());
        assert!(one.get_ca().is_some() && one.get_client_cert_key().is_some());
        let repinned = peer(&link(b"b"), 7, (sid, key_of(sid)), &credentials);
        assert_ne!(one.group_key, repinned.group_key, "a new pin, a new pool");
        let other = &opencloud_protocol::routes::new_sid();
        let other = peer(&link(b"a"), 7, (other, key_of(other)), &credentials);
        assert_ne!(one.group_key, other.group_key, "a session of its own");
    }

    #[test]
    fn only_the_pinned_leaf_passes() {
        let pinned = CertFingerprint::of(b"the leaf control issued");
        let digest = digest_presenting(b"the leaf control issued");
        assert!(check_pin(Some(&digest), &pinned).is_ok());
        let other = digest_presenting(b"an older leaf of the same host");
        assert!(check_pin(Some(&other), &pinned).is_err());
    }

    #[test]
    fn a_connection_without_tls_or_without_a_digest_never_passes() {
        let pinned = CertFingerprint::of(b"leaf");
        assert!(check_pin(None, &pinned).is_err());
        assert!(check_pin(Some(&Digest::default()), &pinned).is_err());
        let empty = Digest {
            ssl_digest: Some(Arc::new(SslDigest::new("", "", None, None, Vec::new()))),
            ..Digest::default()
        };
        assert!(check_pin(Some(&empty), &pinned).is_err());
    }

    #[test]
    fn handshake_failures_are_named_by_what_was_wrong() {
        use rustls::pki_types::{ServerName, UnixTime};
        use rustls::CertificateError;
        // As Pingora's rustls connector reports a failed handshake.
        let failed = |e: CertificateError| {
            *Error::explain(
                ErrorType::TLSHandshakeFailure,
                format!(
                    "TLS connect() failed: {}, SNI: x.h1.hosts.opencloud.internal",
                    rustls::Error::InvalidCertificate(e)
                ),
            )
        };
        let at = |s| UnixTime::since_unix_epoch(std::time::Duration::from_secs(s));
        for (error, label) in [
            (
                CertificateError::NotValidForNameContext {
                    expected: ServerName::try_from("x.h1.hosts.opencloud.internal").unwrap(),
                    presented: vec!["*.h2.hosts.opencloud.internal".into()],
                },
                "wrong_host",
            ),
            (
                CertificateError::ExpiredContext {
                    time: at(200),
                    not_after: at(100),
                },
                "expired",
            ),
            (
                CertificateError::NotValidYetContext {
                    time: at(100),
                    not_before: at(200),
                },
                "not_yet_valid",
            ),
            (CertificateError::UnknownIssuer, "unknown_ca"),
            (CertificateError::BadSignature, "unknown_ca"),
            (CertificateError::Revoked, "handshake"),
        ] {
            assert_eq!(
                handshake_refusal(&failed(error.clone())),
                label,
                "{error:?}"
            );
        }
        let alert = Error::explain(ErrorType::TLSHandshakeFailure, "received fatal alert");
        assert_eq!(handshake_refusal(&alert), "handshake");
    }
}
