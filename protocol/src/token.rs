//! Signed tokens: `v1.<kid>.<payload b64url>.<HMAC-SHA256 b64url>`.
//!
//! The MAC covers `v1.<kid>.<payload>`; the payload is compact JSON. The kind
//! is inside the signed payload, so a ticket can never be replayed as a
//! platform token and the other way round.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::keys::Keyring;

type HmacSha256 = Hmac<Sha256>;

const VERSION: &str = "v1";

/// How long a platform token lives, in seconds (12 h).
pub const PLATFORM_TOKEN_SECONDS: u64 = 12 * 3600;

/// How long a ticket to enter a session is valid, in seconds.
pub const TICKET_SECONDS: u64 = 60;

/// Tokens longer than this are refused before any decoding work.
pub const MAX_TOKEN_LEN: usize = 2048;

/// What a token may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenKind {
    /// The platform login: `oc_session` cookie or `Authorization: Bearer`.
    #[serde(rename = "p")]
    Platform,
    /// The `oc_s` cookie on one session origin.
    #[serde(rename = "s")]
    SessionCookie,
    /// A short-lived, single-use ticket to enter one session origin.
    #[serde(rename = "t")]
    Ticket,
}

/// What a token says. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(rename = "t")]
    pub kind: TokenKind,
    /// The user the token speaks for.
    #[serde(rename = "u")]
    pub user_id: u64,
    /// The login session it belongs to; revoking that revokes the token.
    #[serde(rename = "l")]
    pub login_session: String,
    #[serde(rename = "i")]
    pub issued_at: u64,
    #[serde(rename = "e")]
    pub expires_at: u64,
    /// The notebook session, for session cookies and tickets.
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}

impl Claims {
    /// A platform token for `user_id` in `login_session`, issued at `now`.
    pub fn platform(user_id: u64, login_session: impl Into<String>, now: u64) -> Self {
        Self {
            kind: TokenKind::Platform,
            user_id,
            login_session: login_session.into(),
            issued_at: now,
            expires_at: now + PLATFORM_TOKEN_SECONDS,
            sid: None,
        }
    }

    /// A ticket to enter session `sid`, valid for [`TICKET_SECONDS`].
    pub fn ticket(
        user_id: u64,
        login_session: impl Into<String>,
        sid: impl Into<String>,
        now: u64,
    ) -> Self {
        Self {
            kind: TokenKind::Ticket,
            user_id,
            login_session: login_session.into(),
            issued_at: now,
            expires_at: now + TICKET_SECONDS,
            sid: Some(sid.into()),
        }
    }

    /// The `oc_s` cookie for session `sid`, made from a verified ticket.
    pub fn session_cookie(ticket: &Claims, now: u64) -> Self {
        Self {
            kind: TokenKind::SessionCookie,
            user_id: ticket.user_id,
            login_session: ticket.login_session.clone(),
            issued_at: now,
            expires_at: now + PLATFORM_TOKEN_SECONDS,
            sid: ticket.sid.clone(),
        }
    }

    /// True once more than half the lifetime has passed: time to re-issue.
    pub fn past_half_life(&self, now: u64) -> bool {
        let lifetime = self.expires_at.saturating_sub(self.issued_at);
        now.saturating_sub(self.issued_at) * 2 > lifetime
    }
}

/// Why a token was refused. Each reason is counted separately by callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token was signed with a key this server does not know")]
    UnknownKey,
    #[error("the token's signature does not match")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not meant for this use")]
    WrongKind,
}

impl crate::metrics::LabelValue for TokenError {
    const ALL: &'static [Self] = &[
        TokenError::Malformed,
        TokenError::UnknownKey,
        TokenError::BadSignature,
        TokenError::Expired,
        TokenError::WrongKind,
    ];
    fn label(self) -> &'static str {
        self.reason()
    }
}

impl TokenError {
    /// A short label for metrics.
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::UnknownKey => "unknown_key",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::WrongKind => "wrong_kind",
        }
    }
}

/// Signs `claims` with the keyring's signing key.
pub fn sign(keys: &Keyring, claims: &Claims) -> String {
    let (key_id, secret) = keys.signing_key();
    let payload = serde_json::to_vec(claims).expect("claims always serialise");
    let mut token = String::with_capacity(8 + key_id.len() + payload.len() * 2 + 44);
    token.push_str(VERSION);
    token.push('.');
    token.push_str(key_id);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
    let mac = mac_of(secret, token.as_bytes()).finalize().into_bytes();
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(mac, &mut token);
    token
}

/// Verifies `token` as a token of `kind` at time `now`.
///
/// The signature is checked (in constant time) before the payload is parsed,
/// so nothing an attacker wrote is interpreted unless a key signed it.
pub fn verify(
    keys: &Keyring,
    token: &str,
    kind: TokenKind,
    now: u64,
) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let (signed, mac_b64) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let mut parts = signed.splitn(3, '.');
    let (Some(VERSION), Some(key_id), Some(payload_b64)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let secret = keys.secret(key_id).ok_or(TokenError::UnknownKey)?;
    let mac = URL_SAFE_NO_PAD
        .decode(mac_b64)
        .map_err(|_| TokenError::Malformed)?;
    mac_of(secret, signed.as_bytes())
        .verify_slice(&mac)
        .map_err(|_| TokenError::BadSignature)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| TokenError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
    if claims.kind != kind {
        return Err(TokenError::WrongKind);
    }
    if now >= claims.expires_at {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

fn mac_of(secret: &[u8], data: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(data);
    mac
}

/// HMAC-SHA256 of `data` under the signing key, base64url: for values that
/// must be derivable by the server but unforgeable (CSRF tokens).
pub fn derive(keys: &Keyring, purpose: &str, data: &str) -> String {
    let (_, secret) = keys.signing_key();
    let mut mac = mac_of(secret, purpose.as_bytes());
    mac.update(b"\0");
    mac.update(data.as_bytes());
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_790_000_000;

    fn ring(ids: &[&str], signing: &str) -> Keyring {
        let mut text = format!("signing_key = \"{signing}\"\n");
        for (n, id) in ids.iter().enumerate() {
            let secret = URL_SAFE_NO_PAD.encode([n as u8 + 1; 32]);
            text.push_str(&format!("[[keys]]\nid = \"{id}\"\nsecret = \"{secret}\"\n"));
        }
        Keyring::from_toml("keys.toml", &text).unwrap()
    }

    #[test]
    fn a_signed_token_verifies_and_round_trips() {
        let keys = ring(&["a"], "a");
        let claims = Claims::platform(42, "ls1", NOW);
        let token = sign(&keys, &claims);
        assert!(token.starts_with("v1.a."));
        assert_eq!(
            verify(&keys, &token, TokenKind::Platform, NOW + 1),
            Ok(claims)
        );
    }

    #[test]
    fn an_expired_token_fails() {
        let keys = ring(&["a"], "a");
        let token = sign(&keys, &Claims::platform(1, "ls", NOW));
        let at_expiry = NOW + PLATFORM_TOKEN_SECONDS;
        assert_eq!(
            verify(&keys, &token, TokenKind::Platform, at_expiry),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn a_token_of_another_kind_fails() {
        let keys = ring(&["a"], "a");
        let mut claims = Claims::platform(1, "ls", NOW);
        claims.kind = TokenKind::Ticket;
        claims.sid = Some("s1".into());
        let token = sign(&keys, &claims);
        assert_eq!(
            verify(&keys, &token, TokenKind::Platform, NOW),
            Err(TokenError::WrongKind)
        );
        assert!(verify(&keys, &token, TokenKind::Ticket, NOW).is_ok());
    }

    #[test]
    fn an_unknown_key_id_fails() {
        let token = sign(&ring(&["a"], "a"), &Claims::platform(1, "ls", NOW));
        let other = ring(&["b"], "b");
        assert_eq!(
            verify(&other, &token, TokenKind::Platform, NOW),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn a_token_signed_with_a_retired_but_listed_key_still_verifies() {
        let old = ring(&["old", "new"], "old");
        let token = sign(&old, &Claims::platform(7, "ls", NOW));
        let rotated = ring(&["old", "new"], "new");
        assert_eq!(rotated.signing_key_id(), "new");
        assert!(verify(&rotated, &token, TokenKind::Platform, NOW).is_ok());
        let fresh = sign(&rotated, &Claims::platform(7, "ls", NOW));
        assert!(fresh.starts_with("v1.new."));
    }

    #[test]
    fn a_key_id_forged_onto_another_keys_signature_fails() {
        let keys = ring(&["a", "b"], "a");
        let token = sign(&keys, &Claims::platform(1, "ls", NOW));
        let forged = token.replacen("v1.a.", "v1.b.", 1);
        assert_eq!(
            verify(&keys, &forged, TokenKind::Platform, NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn half_life_is_six_hours() {
        let claims = Claims::platform(1, "ls", NOW);
        assert!(!claims.past_half_life(NOW + 6 * 3600));
        assert!(claims.past_half_life(NOW + 6 * 3600 + 1));
    }

    proptest! {
        #[test]
        fn any_changed_byte_fails(index in 0usize..400, replacement in any::<u8>()) {
            let keys = ring(&["a"], "a");
            let token = sign(&keys, &Claims::platform(99, "login-session-id-0123", NOW));
            let mut bytes = token.clone().into_bytes();
            let index = index % bytes.len();
            prop_assume!(bytes[index] != replacement);
            bytes[index] = replacement;
            let changed = String::from_utf8_lossy(&bytes).into_owned();
            prop_assume!(changed != token);
            prop_assert!(verify(&keys, &changed, TokenKind::Platform, NOW).is_err());
        }

        #[test]
        fn any_claims_round_trip(user in any::<u64>(), ls in "[A-Za-z0-9_-]{1,40}", issued in 0u64..4_000_000_000) {
            let keys = ring(&["a"], "a");
            let claims = Claims::platform(user, ls, issued);
            let token = sign(&keys, &claims);
            prop_assert_eq!(verify(&keys, &token, TokenKind::Platform, issued), Ok(claims));
        }

        #[test]
        fn arbitrary_input_never_panics_or_verifies(input in ".{0,300}") {
            let keys = ring(&["a"], "a");
            prop_assert!(verify(&keys, &input, TokenKind::Platform, NOW).is_err());
        }
    }
}
