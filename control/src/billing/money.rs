//! Amounts and durations in words for pages.

/// Micro units in one minor unit (a cent).
pub const MICRO_PER_MINOR: i64 = 1_000_000;

/// `12.50 USD` for an amount in minor units.
pub fn minor(amount: i64, currency: &str) -> String {
    let sign = if amount < 0 { "-" } else { "" };
    let abs = amount.unsigned_abs();
    format!("{sign}{}.{:02} {currency}", abs / 100, abs % 100)
}

/// `0.0029 USD` for an amount in micro units: four decimals, so a few
/// seconds' earnings do not read as nothing.
pub fn micro(amount: i64, currency: &str) -> String {
    let sign = if amount < 0 { "-" } else { "" };
    // Hundredths of a cent, rounded down.
    let ten_thousandths = amount.unsigned_abs() / (MICRO_PER_MINOR as u64 / 100);
    format!(
        "{sign}{}.{:04} {currency}",
        ten_thousandths / 10_000,
        ten_thousandths % 10_000
    )
}

/// `2 h 05 min`, `4 min 10 s`, `0 s`.
pub fn seconds(total: i64) -> String {
    let sign = if total < 0 { "-" } else { "" };
    let s = total.unsigned_abs();
    let (h, m, sec) = (s / 3600, s % 3600 / 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{sign}{sec} s"),
        (0, m) => format!("{sign}{m} min {sec:02} s"),
        (h, 0) if sec == 0 => format!("{sign}{h} h"),
        (h, m) => format!("{sign}{h} h {m:02} min"),
    }
}

/// Minor units from an amount as people type it: `12`, `12.5`, `12.50`;
/// `None` for anything else (a sign, more than two decimals, too large).
pub fn parse_minor(text: &str) -> Option<u64> {
    let text = text.trim();
    let (whole, cents) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || whole.len() > 12 || cents.len() > 2 || !digits(whole) || !digits(cents) {
        return None;
    }
    let cents: u64 = format!("{cents:0<2}").parse().ok()?;
    Some(whole.parse::<u64>().ok()? * 100 + cents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_read_as_people_write_them() {
        assert_eq!(minor(1905, "USD"), "19.05 USD");
        assert_eq!(minor(-500, "EUR"), "-5.00 EUR");
        assert_eq!(micro(291_666, "USD"), "0.0029 USD");
        assert_eq!(micro(350 * MICRO_PER_MINOR, "USD"), "3.5000 USD");
        assert_eq!(seconds(0), "0 s");
        assert_eq!(seconds(250), "4 min 10 s");
        assert_eq!(seconds(7500), "2 h 05 min");
        assert_eq!(seconds(36_000), "10 h");
    }

    #[test]
    fn typed_amounts_become_minor_units() {
        assert_eq!(parse_minor("12"), Some(1200));
        assert_eq!(parse_minor(" 12.5 "), Some(1250));
        assert_eq!(parse_minor("0.07"), Some(7));
        for bad in ["", "-1", "1.234", "1,50", ".5", "1e3", "9999999999999"] {
            assert_eq!(parse_minor(bad), None, "{bad:?}");
        }
    }
}
