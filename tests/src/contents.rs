//! Files in a session through Jupyter's contents API, as Lab reads and
//! writes them: through the gateway, with the session cookie, the page's
//! own Origin and Jupyter's XSRF pair.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::jupyter::XSRF;
use crate::stack::TestStack;

impl TestStack {
    fn contents(
        &self,
        sid: &str,
        method: reqwest::Method,
        path: &str,
        cookie: &str,
    ) -> reqwest::RequestBuilder {
        let gateway = self.gateway();
        let origin = gateway.session_origin(sid);
        gateway
            .client(&[sid], false)
            .request(method, format!("{origin}/api/contents/{path}"))
            .header("cookie", format!("{cookie}; _xsrf={XSRF}"))
            .header("x-xsrftoken", XSRF)
            .header("origin", origin)
    }

    /// Writes `text` to `path` in session `sid`'s project.
    pub async fn write_file(&self, sid: &str, cookie: &str, path: &str, text: &str) {
        let r = self
            .contents(sid, reqwest::Method::PUT, path, cookie)
            .json(&json!({"type": "file", "format": "text", "content": text}))
            .send()
            .await
            .expect("PUT a file");
        let status = r.status();
        assert!(
            status == StatusCode::CREATED || status == StatusCode::OK,
            "writing {path}: {status} {}",
            r.text().await.unwrap_or_default()
        );
    }

    /// The text of `path` in session `sid`'s project, or `None` when it is not there.
    pub async fn read_file(&self, sid: &str, cookie: &str, path: &str) -> Option<String> {
        let r = self
            .contents(
                sid,
                reqwest::Method::GET,
                &format!("{path}?content=1&format=text&type=file"),
                cookie,
            )
            .send()
            .await
            .expect("GET a file");
        if r.status() == StatusCode::NOT_FOUND {
            return None;
        }
        assert_eq!(r.status(), StatusCode::OK, "reading {path}");
        let body: Value = r.json().await.expect("a contents model");
        body["content"].as_str().map(str::to_owned)
    }
}
