//! The few pages the gateway answers itself: small, self-contained HTML
//! (session origins must not load anything from the platform), and the
//! security headers every answer of the gateway's own carries.

/// The pages' only style, inline; the policy allows exactly this text.
const STYLE: &str = "body{font-family:system-ui,sans-serif;background:#f6f7fb;color:#1b1f2a;margin:0}\
main{max-width:520px;margin:12vh auto;background:#fff;border:1px solid #e3e7ef;border-radius:10px;padding:28px}\
h1{font-size:1.5rem;margin:0 0 .5em}p{color:#5f6b7a;line-height:1.5}\
.btn{display:inline-block;background:#3b5bdb;color:#fff;padding:.55em 1em;border-radius:8px;text-decoration:none}";

/// The headers on every answer the gateway writes itself (pages, refusals),
/// never on what a session's server answers. The policy allows nothing but
/// [`STYLE`], by its SHA-256: no script, no frame, no form, no base.
pub const OWN_ANSWER_HEADERS: [(&str, &str); 4] = [
    (
        "content-security-policy",
        "default-src 'none'; style-src 'sha256-DZ3IgGL1wZZT+0J4drSbsVuE74MLujKWL3QsApZ0l+M='; \
         frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),
];

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A page with a title, a message and an optional link (href, label).
pub fn page(title: &str, message: &str, link: Option<(&str, &str)>) -> String {
    page_with_head(title, message, link, "")
}

/// The page shown while a session's server starts: it reloads itself every
/// second, so the browser lands in Lab as soon as the route is ready.
pub fn starting_page() -> String {
    page_with_head(
        "Starting your notebook server…",
        "This usually takes a couple of seconds. The page reloads by itself.",
        None,
        "<meta http-equiv=\"refresh\" content=\"1\">",
    )
}

fn page_with_head(title: &str, message: &str, link: Option<(&str, &str)>, head: &str) -> String {
    let link = link
        .map(|(href, label)| {
            format!(
                "<p><a class=\"btn\" href=\"{}\">{}</a></p>",
                escape(href),
                escape(label)
            )
        })
        .unwrap_or_default();
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         {head}<title>{title} · OpenCloud</title><style>{STYLE}\
         </style></head><body><main><h1>{title}</h1><p>{message}</p>{link}</main></body></html>",
        title = escape(title),
        message = escape(message),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        let html = page("<t>", "a & \"b\"", Some(("/x?a=1&b=2", "go")));
        assert!(html.contains("&lt;t&gt;") && html.contains("a &amp; &quot;b&quot;"));
        assert!(html.contains("href=\"/x?a=1&amp;b=2\""));
    }
}
