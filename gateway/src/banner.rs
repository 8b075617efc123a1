//! The compute-time banner in Lab: the gateway adds one script tag to the
//! end of Lab's HTML page, and answers the script's two calls itself
//! (`/_oc/banner.js`, and `/_oc/balance`, asked of control for the
//! session's owner). Only Lab's page is touched, only when it arrives
//! uncompressed and whole, so nothing else a session serves changes.

use bytes::{Bytes, BytesMut};
use http::header;
use pingora::http::ResponseHeader;

/// The script, served on every session origin.
pub const SCRIPT: &str = include_str!("../static/banner.js");

/// What is added after Lab's HTML (parsers put it into the body).
pub const TAG: &[u8] = b"<script src=\"/_oc/banner.js\" defer></script>\n";

/// Whether this answer is Lab's page, to which the tag is added: a 200
/// HTML document under `/lab`, not compressed.
pub fn is_lab_page(path: &str, response: &ResponseHeader) -> bool {
    let lab = path == "/lab" || path.starts_with("/lab/") && !path.starts_with("/lab/api/");
    let html = response
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
    let plain = response
        .headers
        .get(header::CONTENT_ENCODING)
        .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
    lab && html && plain && response.status.as_u16() == 200
}

/// Appends the tag to the body's last piece.
pub fn append_at_end(body: &mut Option<Bytes>, end_of_stream: bool) {
    if !end_of_stream {
        return;
    }
    let mut out = BytesMut::new();
    if let Some(last) = body.take() {
        out.extend_from_slice(&last);
    }
    out.extend_from_slice(TAG);
    *body = Some(out.freeze());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(content_type: &str, encoding: Option<&str>) -> ResponseHeader {
        let mut r = ResponseHeader::build(200, None).unwrap();
        r.insert_header("content-type", content_type).unwrap();
        if let Some(e) = encoding {
            r.insert_header("content-encoding", e).unwrap();
        }
        r
    }

    #[test]
    fn only_labs_uncompressed_html_page_gets_the_tag() {
        let html = response("text/html; charset=UTF-8", None);
        assert!(is_lab_page("/lab", &html));
        assert!(is_lab_page("/lab/tree/notes.ipynb", &html));
        assert!(!is_lab_page("/lab/api/settings", &html));
        assert!(!is_lab_page("/api/contents", &html));
        assert!(
            !is_lab_page("/files/page.html", &html),
            "a user's own HTML file"
        );
        assert!(!is_lab_page("/lab", &response("application/json", None)));
        assert!(!is_lab_page("/lab", &response("text/html", Some("gzip"))));
    }

    #[test]
    fn the_tag_goes_after_the_last_piece_only() {
        let mut body = Some(Bytes::from_static(b"<html>..."));
        append_at_end(&mut body, false);
        assert_eq!(body.as_deref(), Some(&b"<html>..."[..]));
        append_at_end(&mut body, true);
        assert!(body.unwrap().ends_with(TAG));
        let mut empty = None;
        append_at_end(&mut empty, true);
        assert_eq!(empty.as_deref(), Some(TAG));
    }
}
