//! Password hashing, in its own crate so that it can be optimised in debug
//! builds too: the PBKDF2 loop is generic and would otherwise be compiled,
//! unoptimised, into whichever crate calls it (20× slower at 600 000 rounds).

use pbkdf2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use pbkdf2::{Algorithm, Params, Pbkdf2};
use rand::RngCore;

/// PBKDF2-HMAC-SHA256 with a random 16-byte salt, as a PHC string
/// (`$pbkdf2-sha256$i=600000,l=32$<salt>$<hash>`).
pub fn hash(password: &str, iterations: u32) -> String {
    let mut salt_bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt_bytes);
    let salt = SaltString::encode_b64(&salt_bytes).expect("16 bytes is a valid salt");
    let params = Params {
        rounds: iterations,
        output_length: 32,
    };
    Pbkdf2
        .hash_password_customized(
            password.as_bytes(),
            Some(Algorithm::Pbkdf2Sha256.ident()),
            None,
            params,
            &salt,
        )
        .expect("PBKDF2 with valid params cannot fail")
        .to_string()
}

/// True when `password` matches the PHC string; the comparison is constant
/// time. A malformed stored string never matches.
pub fn verify(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|parsed| Pbkdf2.verify_password(password.as_bytes(), &parsed).is_ok())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_phc_strings_with_the_configured_rounds() {
        let phc = hash("correct horse battery", 600_000);
        assert!(phc.starts_with("$pbkdf2-sha256$i=600000,l=32$"), "{phc}");
        assert!(verify("correct horse battery", &phc));
        assert!(!verify("correct horse batterz", &phc));
        assert!(!verify("correct horse battery", "not a hash"));
    }

    #[test]
    fn the_same_password_gets_a_different_salt_each_time() {
        assert_ne!(hash("same password", 1000), hash("same password", 1000));
    }
}
