//! Checks on the raw request head that Pingora's parser lets through.
//!
//! Pingora 0.9.1 accepts Content-Length together with Transfer-Encoding and
//! drops Content-Length before any hook runs, so the decision is made from
//! the raw header bytes, where both are still visible.

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::HeaderMap;
use opencloud_protocol::credentials::split_at_byte;

/// The largest header section we accept.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Why a request head is refused: the status and a short reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

const fn refuse(status: u16, reason: &'static str) -> Refusal {
    Refusal { status, reason }
}

const TOO_LARGE: Refusal = refuse(431, "header section too large");
const MALFORMED_LINE: Refusal = refuse(400, "malformed header line");
const INVALID_LENGTH: Refusal = refuse(400, "invalid content-length");
const CONFLICTING_LENGTHS: Refusal = refuse(400, "conflicting content-length");
const UNSUPPORTED_ENCODING: Refusal = refuse(400, "unsupported transfer-encoding");
const SPACE_IN_NAME: Refusal = refuse(400, "whitespace in a header name");
const LENGTH_WITH_ENCODING: Refusal = refuse(400, "content-length with transfer-encoding");

/// Requests refused before proxying, by reason: the head checks' reasons
/// and the deadline's `slow header`.
pub const REJECTED_REQUESTS: &str = "opencloud_gateway_rejected_requests_total";

/// Every reason [`check_raw_head`] gives.
pub const REASONS: [&str; 7] = [
    TOO_LARGE.reason,
    MALFORMED_LINE.reason,
    INVALID_LENGTH.reason,
    CONFLICTING_LENGTHS.reason,
    UNSUPPORTED_ENCODING.reason,
    SPACE_IN_NAME.reason,
    LENGTH_WITH_ENCODING.reason,
];

/// How the parsed headers frame the request body, when they leave nothing
/// for [`check_raw_head`] to find: `Some(whether a body follows)`.
/// Pingora drops Content-Length when Transfer-Encoding is present, so any
/// Transfer-Encoding, or a Content-Length that is not one plain number,
/// gives `None` and sends the request through the raw check; the usual
/// request has neither. (Whitespace in a header name never gets this far:
/// the parser refuses it.)
pub fn plain_body_framing(headers: &HeaderMap) -> Option<bool> {
    // One walk comparing standard names costs less than two hashed lookups
    // for the few headers of a usual request.
    let mut length = None;
    for (name, value) in headers {
        if name == TRANSFER_ENCODING || (name == CONTENT_LENGTH && length.is_some()) {
            return None;
        }
        if name == CONTENT_LENGTH {
            length = Some(value.as_bytes());
        }
    }
    match length {
        None => Some(false),
        Some(digits) if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) => {
            Some(digits.iter().any(|digit| *digit != b'0'))
        }
        Some(_) => None,
    }
}

/// Checks the request head as it arrived (request line and header lines).
pub fn check_raw_head(raw: &[u8]) -> Result<(), Refusal> {
    if raw.len() > MAX_HEADER_BYTES {
        return Err(TOO_LARGE);
    }
    let mut content_length: Option<&[u8]> = None;
    let mut transfer_encoding = false;
    for line in header_lines(raw) {
        if line.is_empty() {
            break;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            return Err(MALFORMED_LINE);
        };
        let name = &line[..colon];
        if name.eq_ignore_ascii_case(b"content-length") {
            for part in trim(&line[colon + 1..]).split(|b| *b == b',').map(trim) {
                if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
                    return Err(INVALID_LENGTH);
                }
                match content_length {
                    Some(seen) if seen != part => return Err(CONFLICTING_LENGTHS),
                    _ => content_length = Some(part),
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Only a single, plain `chunked` is understood the same way by
            // every hop; anything else is a smuggling attempt or a mistake.
            if transfer_encoding || !trim(&line[colon + 1..]).eq_ignore_ascii_case(b"chunked") {
                return Err(UNSUPPORTED_ENCODING);
            }
            transfer_encoding = true;
        } else if name.iter().any(u8::is_ascii_whitespace) {
            return Err(SPACE_IN_NAME);
        }
    }
    if transfer_encoding && content_length.is_some() {
        return Err(LENGTH_WITH_ENCODING);
    }
    Ok(())
}

/// The header lines after the request line, without their line ends.
fn header_lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    split_at_byte(raw, b'\n')
        .skip(1)
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |p| p + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &str) -> Vec<u8> {
        format!("POST / HTTP/1.1\r\nHost: x\r\n{headers}\r\n").into_bytes()
    }

    #[test]
    fn ordinary_requests_pass() {
        assert_eq!(check_raw_head(&head("Content-Length: 5\r\n")), Ok(()));
        assert_eq!(
            check_raw_head(&head("Transfer-Encoding: chunked\r\n")),
            Ok(())
        );
        assert_eq!(
            check_raw_head(&head("Content-Length: 5\r\nContent-Length: 5\r\n")),
            Ok(())
        );
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for headers in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: 5, 6\r\n",
            "Content-Length: -1\r\n",
            "Transfer-Encoding: chunked, identity\r\n",
            "Transfer-Encoding: xchunked\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding\t: chunked\r\n",
        ] {
            let got = check_raw_head(&head(headers));
            assert_eq!(got.map_err(|r| r.status), Err(400), "{headers:?}");
            // Bare line feeds end lines too.
            let bare = head(headers)
                .into_iter()
                .filter(|b| *b != b'\r')
                .collect::<Vec<_>>();
            assert_eq!(
                check_raw_head(&bare).map_err(|r| r.status),
                Err(400),
                "{headers:?}"
            );
        }
        let no_blank_line =
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked";
        assert_eq!(
            check_raw_head(no_blank_line).map_err(|r| r.status),
            Err(400)
        );
        assert_eq!(check_raw_head(b"GET / HTTP/1.1"), Ok(()));
    }

    #[test]
    fn only_plain_parsed_heads_skip_the_raw_check() {
        let parsed = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.append(*name, value.parse().unwrap());
            }
            plain_body_framing(&headers)
        };
        assert_eq!(parsed(&[("host", "x")]), Some(false));
        assert_eq!(parsed(&[("content-length", "5")]), Some(true));
        assert_eq!(parsed(&[("content-length", "00")]), Some(false));
        assert_eq!(parsed(&[("transfer-encoding", "chunked")]), None);
        assert_eq!(parsed(&[("content-length", "5, 6")]), None);
        assert_eq!(
            parsed(&[("content-length", "5"), ("content-length", "5")]),
            None
        );
        assert_eq!(parsed(&[("content-length", "")]), None);
    }

    #[test]
    fn an_oversized_head_gets_431() {
        let big = format!("X-Big: {}\r\n", "a".repeat(MAX_HEADER_BYTES));
        assert_eq!(check_raw_head(&head(&big)).map_err(|r| r.status), Err(431));
    }
}
