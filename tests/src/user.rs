//! A registered, logged-in user talking to the platform with their token,
//! through the gateway when the stack has one: every request a suite makes
//! as someone goes through here, so the chain of building, authenticating,
//! sending and decoding is written once.

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};

/// The password every test user has.
pub const PASSWORD: &str = "correct horse battery";

pub struct TestUser {
    pub id: u64,
    pub email: String,
    pub password: String,
    pub token: String,
    pub http: reqwest::Client,
    /// The platform origin the user talks to.
    pub base: String,
}

impl TestUser {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request to the platform as this user, for the odd cases (forms,
    /// headers, bodies that are not JSON).
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    /// Sends `request` and returns the status and the JSON body (`Null`
    /// when there is none).
    async fn send(&self, request: RequestBuilder) -> (StatusCode, Value) {
        let r = request.send().await.expect("request");
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.request(Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send_raw(Method::POST, path, body).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send_raw(Method::PATCH, path, body).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.request(Method::DELETE, path)).await
    }

    /// Any method with a JSON body.
    pub async fn send_raw(&self, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(self.request(method, path).json(&body)).await
    }

    /// GET that must answer 200 OK; its JSON body.
    pub async fn get_json(&self, path: &str) -> Value {
        ok("GET", path, self.get(path).await)
    }

    /// POST that must answer 200 OK; its JSON body.
    pub async fn post_json(&self, path: &str, body: Value) -> Value {
        ok("POST", path, self.post(path, body).await)
    }

    /// PATCH that must answer 200 OK; its JSON body.
    pub async fn patch_json(&self, path: &str, body: Value) -> Value {
        ok("PATCH", path, self.patch(path, body).await)
    }

    /// A page (or any text) as this user: the status and the body.
    pub async fn get_text(&self, path: &str) -> (StatusCode, String) {
        let r = self
            .request(Method::GET, path)
            .send()
            .await
            .expect("request");
        (r.status(), r.text().await.expect("body"))
    }

    /// A page that must answer 200 OK; its body.
    pub async fn page(&self, path: &str) -> String {
        self.page_with_status(path, StatusCode::OK).await
    }

    /// A page (or any text) that must answer `status`; its body.
    pub async fn page_with_status(&self, path: &str, status: StatusCode) -> String {
        let (got, body) = self.get_text(path).await;
        assert_eq!(got, status, "GET {path}: {body}");
        body
    }

    /// Posts a form, as a page does; the response as it came.
    pub async fn post_form(&self, path: &str, form: &[(&str, &str)]) -> Response {
        self.request(Method::POST, path)
            .form(form)
            .send()
            .await
            .expect("request")
    }

    /// Creates a project and returns its id.
    pub async fn create_project(&self, name: &str) -> u64 {
        let (status, body) = self.post("/api/v1/projects", json!({"name": name})).await;
        assert_eq!(status, StatusCode::CREATED, "create project: {body}");
        body["project"]["id"].as_u64().expect("project id")
    }
}

fn ok(method: &str, path: &str, (status, body): (StatusCode, Value)) -> Value {
    assert_eq!(status, StatusCode::OK, "{method} {path}: {body}");
    body
}
