//! The route table control streams to the gateways: hosts, sessions and
//! revoked login sessions, as a snapshot and then versioned deltas.
//!
//! The wire form is newline-delimited JSON on
//! `GET /internal/v1/routes/watch?since=V`: one [`WatchMessage`] per line.
//! Versions are strictly increasing; a gateway applies a delta only when its
//! version is exactly one more than what it holds, and otherwise asks again
//! from the version it has.

use serde::{Deserialize, Serialize};

use crate::link::LinkKey;

/// A route table version: the counter control bumps with each change.
pub type Version = u64;

/// Whether a host takes sessions, as control last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Heartbeating and taking new sessions.
    Online,
    /// Heartbeating, but the owner asked for no new sessions.
    Draining,
    /// No heartbeat for too long: its sessions are lost.
    Offline,
}

/// A host as the gateways need it: where to connect, how to prove who is
/// at the other end, and how to check it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRoute {
    pub id: u64,
    /// The advertised address, an IP the gateway can connect to.
    pub address: String,
    /// The host link's port on `address` (see [`crate::link`]).
    pub link_port: u16,
    /// The host's link key; `None` until its agent first registers.
    pub link_key: Option<LinkKey>,
    /// Full URL the gateway probes, e.g. `http://10.0.0.5:7000/healthz`.
    pub health_url: String,
    pub state: HostState,
}

impl std::fmt::Debug for HostRoute {
    // The link key never reaches logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRoute")
            .field("id", &self.id)
            .field("address", &self.address)
            .field("link_port", &self.link_port)
            .field("health_url", &self.health_url)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Where a session is in its life, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Placed on a host; its server is not answering yet.
    Starting,
    /// Its server answers through its host's link.
    Running,
    /// The host went away; kept as a tombstone so users get a clear page.
    Lost,
    /// Ended on purpose; kept as a tombstone for a while.
    Stopped,
}

impl SessionState {
    /// True when requests may be forwarded to the upstream.
    pub fn is_live(self) -> bool {
        matches!(self, SessionState::Starting | SessionState::Running)
    }
}

/// One notebook session: who owns it and which host serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRoute {
    pub sid: String,
    pub owner: u64,
    pub host: u64,
    pub state: SessionState,
}

/// A revoked login session, carried until its tokens would have expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub login_session: String,
    /// Unix seconds after which the entry may be dropped.
    pub expires_at: u64,
}

/// One change to the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    UpsertHost(HostRoute),
    RemoveHost { id: u64 },
    UpsertSession(SessionRoute),
    RemoveSession { sid: String },
    Revoke(Revocation),
}

/// The whole table at one version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: Version,
    pub hosts: Vec<HostRoute>,
    pub sessions: Vec<SessionRoute>,
    pub revocations: Vec<Revocation>,
}

/// The changes that take the table from `version - 1` to `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub version: Version,
    pub changes: Vec<Change>,
}

/// One line of the watch stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchMessage {
    Snapshot(Snapshot),
    Delta(Delta),
    /// Nothing changed; sent periodically so a dead stream is noticed.
    Heartbeat {
        version: Version,
    },
}

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

    #[test]
    fn watch_messages_round_trip_as_one_json_line() {
        let message = WatchMessage::Delta(Delta {
            version: 7,
            changes: vec![
                Change::UpsertSession(SessionRoute {
                    sid: new_sid(),
                    owner: 1,
                    host: 2,
                    state: SessionState::Running,
                }),
                Change::RemoveHost { id: 3 },
                Change::Revoke(Revocation {
                    login_session: "ls".into(),
                    expires_at: 10,
                }),
            ],
        });
        let line = serde_json::to_string(&message).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(
            serde_json::from_str::<WatchMessage>(&line).unwrap(),
            message
        );
    }

    #[test]
    fn debug_output_hides_the_link_key() {
        let key = LinkKey::generate();
        let route = HostRoute {
            id: 1,
            address: "10.0.0.5".into(),
            link_port: 7000,
            link_key: Some(key.clone()),
            health_url: "http://10.0.0.5:7000/healthz".into(),
            state: HostState::Online,
        };
        assert!(!format!("{route:?}").contains(key.expose()));
    }
}
