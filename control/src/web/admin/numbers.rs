//! Numbers in words for the admin tables: durations, byte counts, and
//! decimals without trailing zeros.

pub const MIB: u64 = 1 << 20;

/// `42 s`, `5 min 07 s`, `1 h 02 min`, `3 d 04 h`.
pub fn human_duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match seconds {
        0..60 => format!("{s} s"),
        60..3600 => format!("{m} min {s:02} s"),
        3600..86_400 => format!("{h} h {m:02} min"),
        _ => format!("{d} d {h:02} h"),
    }
}

/// `512 B`, `1.2 MiB`, `3.0 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    // 1023.96 KiB would print as "1024.0 KiB"; say 1.0 MiB instead.
    if format!("{value:.1}") == "1024.0" && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `v` with at most `decimals` decimals and no trailing zeros: `4`, `0.5`,
/// `1.25`.
pub fn trim_number(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_clock() {
        assert_eq!(human_duration(0), "0 s");
        assert_eq!(human_duration(59), "59 s");
        assert_eq!(human_duration(307), "5 min 07 s");
        assert_eq!(human_duration(3720), "1 h 02 min");
        assert_eq!(human_duration(86_399), "23 h 59 min");
        assert_eq!(human_duration(3 * 86_400 + 4 * 3600 + 59), "3 d 04 h");
    }

    #[test]
    fn byte_counts_use_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1_258_291), "1.2 MiB");
        assert_eq!(human_bytes(MIB - 1), "1.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
    }

    #[test]
    fn decimals_lose_their_trailing_zeros() {
        assert_eq!(trim_number(4.0, 2), "4");
        assert_eq!(trim_number(0.5, 2), "0.5");
        assert_eq!(trim_number(1.25, 2), "1.25");
        assert_eq!(trim_number(0.125, 3), "0.125");
    }
}
