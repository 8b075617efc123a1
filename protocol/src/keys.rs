//! The keys file shared by control and the gateways.
//!
//! ```toml
//! signing_key = "k2026a"
//!
//! [[keys]]
//! id = "k2026a"
//! secret = "<at least 32 random bytes, base64url>"
//! ```
//!
//! Every listed key verifies; only `signing_key` signs. Rotation: add a new
//! key, make it the signing key, and drop the old one after the longest token
//! lifetime (12 h) has passed; nobody is logged out.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde::Deserialize;

/// Shortest secret accepted, in bytes (HMAC-SHA256 gains nothing past 64).
pub const MIN_SECRET_BYTES: usize = 32;

/// A key id as it appears in tokens: 1–32 of `[A-Za-z0-9_-]`.
pub type KeyId = String;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    signing_key: String,
    keys: Vec<KeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: String,
    secret: String,
}

/// A validated set of keys: the one that signs and all that verify.
#[derive(Clone)]
pub struct Keyring {
    signing: usize,
    keys: Vec<(KeyId, Vec<u8>)>,
}

impl std::fmt::Debug for Keyring {
    // Secrets never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("signing_key", &self.signing_key_id())
            .field(
                "key_ids",
                &self.keys.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Why a keys file was refused; names the file, and the key where there is one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyringError {
    /// Not valid TOML or not the keys file's shape.
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    /// A key that parsed but is not acceptable.
    #[error("{file}: key `{key}`: {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
}

impl Keyring {
    /// Parses and validates a keys file; `file` names it in errors.
    pub fn from_toml(file: &str, text: &str) -> Result<Self, KeyringError> {
        let parsed: KeysFile = toml::from_str(text).map_err(|e| KeyringError::Parse {
            file: file.to_owned(),
            message: e.message().to_owned(),
        })?;
        let invalid = |key: String, message: String| KeyringError::Invalid {
            file: file.to_owned(),
            key,
            message,
        };
        if parsed.keys.is_empty() {
            return Err(invalid("keys".into(), "lists no key".into()));
        }
        let mut keys: Vec<(KeyId, Vec<u8>)> = Vec::with_capacity(parsed.keys.len());
        for (index, entry) in parsed.keys.into_iter().enumerate() {
            if !valid_key_id(&entry.id) {
                return Err(invalid(
                    format!("keys[{index}].id"),
                    format!("`{}` must be 1-32 of A-Z a-z 0-9 _ -", entry.id),
                ));
            }
            if keys.iter().any(|(id, _)| *id == entry.id) {
                return Err(invalid(
                    format!("keys[{index}].id"),
                    format!("`{}` is listed twice", entry.id),
                ));
            }
            let secret = URL_SAFE_NO_PAD
                .decode(entry.secret.trim_end_matches('='))
                .map_err(|_| {
                    invalid(
                        format!("keys[{index}].secret"),
                        "is not base64url (A-Z a-z 0-9 - _)".into(),
                    )
                })?;
            if secret.len() < MIN_SECRET_BYTES {
                return Err(invalid(
                    format!("keys[{index}].secret"),
                    format!(
                        "has {} bytes; at least {MIN_SECRET_BYTES} random bytes are needed",
                        secret.len()
                    ),
                ));
            }
            keys.push((entry.id, secret));
        }
        let signing = keys
            .iter()
            .position(|(id, _)| *id == parsed.signing_key)
            .ok_or_else(|| {
                invalid(
                    "signing_key".into(),
                    format!("`{}` is not one of the listed keys", parsed.signing_key),
                )
            })?;
        Ok(Self { signing, keys })
    }

    /// A keys file with one fresh random key, for first start-up and tests.
    pub fn generate_toml(key_id: &str) -> String {
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        format!(
            "# OpenCloud token keys. Keep this file secret; share it only with gateways.\n\
             signing_key = \"{key_id}\"\n\n[[keys]]\nid = \"{key_id}\"\nsecret = \"{}\"\n",
            URL_SAFE_NO_PAD.encode(secret)
        )
    }

    /// The id of the key new tokens are signed with.
    pub fn signing_key_id(&self) -> &str {
        &self.keys[self.signing].0
    }

    pub(crate) fn signing_key(&self) -> (&str, &[u8]) {
        let (id, secret) = &self.keys[self.signing];
        (id, secret)
    }

    pub(crate) fn secret(&self, key_id: &str) -> Option<&[u8]> {
        self.keys
            .iter()
            .find(|(id, _)| id == key_id)
            .map(|(_, secret)| secret.as_slice())
    }
}

fn valid_key_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> String {
        URL_SAFE_NO_PAD.encode([7u8; 32])
    }

    #[test]
    fn a_generated_keys_file_loads() {
        let ring = Keyring::from_toml("keys.toml", &Keyring::generate_toml("k1")).unwrap();
        assert_eq!(ring.signing_key_id(), "k1");
    }

    #[test]
    fn a_short_secret_is_refused_naming_the_key() {
        let text = "signing_key = \"a\"\n[[keys]]\nid = \"a\"\nsecret = \"c2hvcnQ\"\n";
        let err = Keyring::from_toml("keys.toml", text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("keys.toml: key `keys[0].secret`"), "{err}");
        assert!(err.contains("at least 32"), "{err}");
    }

    #[test]
    fn a_signing_key_that_is_not_listed_is_refused() {
        let text = format!(
            "signing_key = \"b\"\n[[keys]]\nid = \"a\"\nsecret = \"{}\"\n",
            secret()
        );
        let err = Keyring::from_toml("keys.toml", &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`signing_key`"), "{err}");
    }

    #[test]
    fn duplicate_ids_and_unknown_fields_are_refused() {
        let s = secret();
        let text = format!(
            "signing_key = \"a\"\n[[keys]]\nid = \"a\"\nsecret = \"{s}\"\n[[keys]]\nid = \"a\"\nsecret = \"{s}\"\n"
        );
        let err = Keyring::from_toml("keys.toml", &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("listed twice"), "{err}");
        let text =
            format!("signing_key = \"a\"\nextra = 1\n[[keys]]\nid = \"a\"\nsecret = \"{s}\"\n");
        let err = Keyring::from_toml("keys.toml", &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `extra`"), "{err}");
    }

    #[test]
    fn debug_output_hides_secrets() {
        let ring = Keyring::from_toml("k", &Keyring::generate_toml("k1")).unwrap();
        let shown = format!("{ring:?}");
        assert!(!shown.contains(&URL_SAFE_NO_PAD.encode(ring.signing_key().1)));
    }
}
