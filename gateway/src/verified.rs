//! Tokens already verified by this gateway. A browser sends the same `oc_s`
//! cookie with every request; verifying it once (HMAC, base64, JSON) and
//! remembering the claims until they expire takes that work off the
//! request path. Only good tokens are remembered, expiry is checked on
//! every hit, and revocation is always checked against the route table.

use std::sync::{Arc, Mutex};

use opencloud_protocol::token::{self, Claims, TokenError, TokenKind};
use opencloud_protocol::Keyring;

use crate::fast_map::FastMap;

/// Entries kept at most; the map is cleared when it is full.
const CAPACITY: usize = 16_384;

/// Claims with the whole token they were verified from, by the token's
/// last bytes: its signature, which nobody can choose for a good token, so
/// hashing 16 bytes spreads the entries as well as hashing all of them.
type ClaimsByToken = FastMap<u128, (Box<[u8]>, Arc<Claims>)>;

fn tail_key(token: &[u8]) -> u128 {
    let mut tail = [0u8; 16];
    let taken = token.len().min(tail.len());
    tail[16 - taken..].copy_from_slice(&token[token.len() - taken..]);
    u128::from_ne_bytes(tail)
}

#[derive(Clone, Default)]
pub struct VerifiedTokens(Arc<Mutex<ClaimsByToken>>);

impl VerifiedTokens {
    /// Like [`token::verify`], answered from memory when `token` was
    /// verified before.
    pub fn verify(
        &self,
        keys: &Keyring,
        token: &[u8],
        kind: TokenKind,
        now: u64,
    ) -> Result<Arc<Claims>, TokenError> {
        let key = tail_key(token);
        let remembered = self
            .lock()
            .get(&key)
            .filter(|(whole, _)| **whole == *token)
            .map(|(_, claims)| claims.clone());
        if let Some(claims) = remembered {
            if claims.kind != kind {
                return Err(TokenError::WrongKind);
            }
            if now >= claims.expires_at {
                return Err(TokenError::Expired);
            }
            return Ok(claims);
        }
        let text = std::str::from_utf8(token).map_err(|_| TokenError::Malformed)?;
        let claims = Arc::new(token::verify(keys, text, kind, now)?);
        let mut cache = self.lock();
        if cache.len() >= CAPACITY {
            cache.clear();
        }
        cache.insert(key, (token.into(), claims.clone()));
        Ok(claims)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClaimsByToken> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache that has verified one platform token, with its keys.
    fn remembering_one_token() -> (Keyring, VerifiedTokens, String) {
        let keys = Keyring::from_toml("k", &Keyring::generate_toml("k1")).unwrap();
        let cache = VerifiedTokens::default();
        let token = token::sign(&keys, &Claims::platform(1, "ls", 100));
        assert!(cache
            .verify(&keys, token.as_bytes(), TokenKind::Platform, 101)
            .is_ok());
        (keys, cache, token)
    }

    #[test]
    fn a_remembered_token_still_expires_and_keeps_its_kind() {
        let (keys, cache, token) = remembering_one_token();
        assert_eq!(
            cache
                .verify(&keys, token.as_bytes(), TokenKind::SessionCookie, 101)
                .unwrap_err(),
            TokenError::WrongKind
        );
        let expiry = 100 + token::PLATFORM_TOKEN_SECONDS;
        assert_eq!(
            cache
                .verify(&keys, token.as_bytes(), TokenKind::Platform, expiry)
                .unwrap_err(),
            TokenError::Expired
        );
    }

    #[test]
    fn a_token_ending_like_a_remembered_one_is_verified_in_full() {
        let (keys, cache, token) = remembering_one_token();
        let mut forged = token.clone().into_bytes();
        forged[2] = if forged[2] == b'A' { b'B' } else { b'A' };
        assert_eq!(tail_key(&forged), tail_key(token.as_bytes()));
        assert!(cache
            .verify(&keys, &forged, TokenKind::Platform, 101)
            .is_err());
    }

    #[test]
    fn bad_tokens_are_never_remembered() {
        let (keys, cache, token) = remembering_one_token();
        let forged = format!("{}x", token);
        assert!(cache
            .verify(&keys, forged.as_bytes(), TokenKind::Platform, 101)
            .is_err());
        assert_eq!(cache.lock().len(), 1);
    }
}
