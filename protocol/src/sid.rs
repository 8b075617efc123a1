//! Session ids: 128 random bits as 26 lowercase base32 characters, a valid
//! DNS label (each session has its own origin) that no other sid prefixes.

/// A session id: 26 characters of lowercase base32, 128 random bits.
/// Lowercase and fixed-length so it is a valid DNS label and no sid is a
/// prefix of another.
pub fn is_valid_sid(sid: &str) -> bool {
    sid.len() == SID_LEN
        && sid
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
}

/// The length of every sid, in characters.
pub const SID_LEN: usize = 26;

/// Encodes 16 random bytes as a sid.
pub fn sid_from_bytes(bytes: [u8; 16]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut bits: u32 = 0;
    let mut held = 0;
    let mut out = String::with_capacity(SID_LEN);
    for byte in bytes {
        bits = (bits << 8) | u32::from(byte);
        held += 8;
        while held >= 5 {
            held -= 5;
            out.push(ALPHABET[((bits >> held) & 31) as usize] as char);
        }
    }
    if held > 0 {
        out.push(ALPHABET[((bits << (5 - held)) & 31) as usize] as char);
    }
    out
}

/// Each byte's value in the sid alphabet, or `INVALID`: decoding is on the
/// gateway's request path, so validation and decoding are one table walk.
const SID_VALUES: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 26 {
        table[b'a' as usize + i] = i as u8;
        i += 1;
    }
    let mut d = 0;
    while d < 6 {
        table[b'2' as usize + d] = 26 + d as u8;
        d += 1;
    }
    table
};
const INVALID: u8 = 0x80;

/// The 16 bytes a sid encodes, for sids made by [`sid_from_bytes`]; `None`
/// for anything else (wrong length, alphabet, or stray padding bits), so
/// each sid has exactly one byte form.
pub fn sid_to_bytes(sid: &[u8]) -> Option<[u8; 16]> {
    let bytes: &[u8; SID_LEN] = sid.try_into().ok()?;
    // 25 digits of 5 bits and the top 3 bits of the last: two runs of 12
    // digits gathered in machine words, then put together.
    let (high, seen_high) = sid_digits(&bytes[..12]);
    let (low, seen_low) = sid_digits(&bytes[12..24]);
    let digit = SID_VALUES[usize::from(bytes[24])];
    let last = SID_VALUES[usize::from(bytes[25])];
    if (seen_high | seen_low | digit | last) & INVALID != 0 || last & 0b11 != 0 {
        return None;
    }
    let value = (u128::from(high) << 68)
        | (u128::from(low) << 8)
        | (u128::from(digit) << 3)
        | u128::from(last >> 2);
    Some(value.to_be_bytes())
}

/// Up to 12 sid digits as one number, and every value seen OR-ed (to find
/// `INVALID`).
fn sid_digits(digits: &[u8]) -> (u64, u8) {
    digits.iter().fold((0, 0), |(number, seen), &b| {
        let value = SID_VALUES[usize::from(b)];
        ((number << 5) | u64::from(value), seen | value)
    })
}

/// A new random sid.
pub fn new_sid() -> String {
    let mut bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    sid_from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sids_are_fixed_length_dns_labels() {
        for _ in 0..100 {
            let sid = new_sid();
            assert!(is_valid_sid(&sid), "{sid}");
        }
        assert_eq!(sid_from_bytes([0; 16]), "a".repeat(26));
        assert!(!is_valid_sid("ABCDEFGHIJKLMNOPQRSTUVWXYZ"));
        assert!(!is_valid_sid(&"a".repeat(25)));
    }

    #[test]
    fn sids_and_their_bytes_convert_both_ways() {
        for _ in 0..100 {
            let mut bytes = [0u8; 16];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
            let sid = sid_from_bytes(bytes);
            assert_eq!(sid_to_bytes(sid.as_bytes()), Some(bytes));
        }
        assert_eq!(
            sid_to_bytes("7".repeat(26).as_bytes()),
            None,
            "padding bits set"
        );
        assert_eq!(sid_to_bytes(b"short"), None);
        let valid = sid_from_bytes([7; 16]);
        for (at, stray) in [
            (0, 'A'),
            (5, '1'),
            (11, '9'),
            (12, '8'),
            (24, '0'),
            (25, '='),
            (3, 'é'),
        ] {
            let mut sid: Vec<char> = valid.chars().collect();
            sid[at] = stray;
            let sid: String = sid.into_iter().collect();
            assert_eq!(sid_to_bytes(sid.as_bytes()), None, "{sid}");
            assert!(!is_valid_sid(&sid));
        }
    }
}
