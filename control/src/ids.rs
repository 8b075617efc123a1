//! Random identifiers that carry no meaning: login session ids, lease
//! holders, generated passwords.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;

/// 128 random bits, base64url.
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A random pause of up to `up_to` milliseconds, so retries spread out.
pub fn small_jitter(up_to: u64) -> u64 {
    rand::rngs::OsRng.next_u64() % up_to.max(1)
}
