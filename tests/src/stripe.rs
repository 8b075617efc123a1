//! A recording stand-in for Stripe's API, the only one the Stripe tests
//! use (Stripe itself is out of reach): on a free loopback port it keeps
//! every request as it came (method, path, headers, form body) and answers
//! Checkout Sessions and refunds the way Stripe does, or fails as told.

use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;

/// One request as the stand-in received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Names in lower case, in the order sent.
    pub headers: Vec<(String, String)>,
    /// The form fields (`application/x-www-form-urlencoded`), in order.
    pub form: Vec<(String, String)>,
    /// The raw body, for searching what must not be in it.
    pub body: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How the stand-in fails every call until told otherwise.
#[derive(Debug, Clone)]
pub enum Failure {
    /// 500 with Stripe's `api_error` body.
    ServerError,
    /// 402 with this message: Stripe's "valid, but it failed".
    Refused(String),
}

#[derive(Default)]
struct Shared {
    recorded: Vec<Recorded>,
    failure: Option<Failure>,
    created: u64,
}

pub struct StripeStandIn {
    /// Where to point `billing.stripe.api_url`: `http://127.0.0.1:PORT`.
    pub url: String,
    shared: Arc<Mutex<Shared>>,
    server: tokio::task::JoinHandle<()>,
}

impl StripeStandIn {
    /// Listens on a free loopback port, serving from the test's runtime.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port for the Stripe stand-in");
        let url = format!("http://{}", listener.local_addr().expect("its address"));
        let shared = Arc::<Mutex<Shared>>::default();
        let app = Router::new().fallback(answer).with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            shared,
            server,
        }
    }

    /// Fails every call from now on as `failure` says; `None` heals it.
    pub fn fail_with(&self, failure: Option<Failure>) {
        lock(&self.shared).failure = failure;
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared).recorded.clone()
    }

    /// The requests to `path` so far, oldest first.
    pub fn calls_to(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}

impl Drop for StripeStandIn {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn stripe_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"type": kind, "message": message}})),
    )
        .into_response()
}

async fn answer(
    State(shared): State<Arc<Mutex<Shared>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let mut shared = lock(&shared);
    shared.recorded.push(Recorded {
        method: method.to_string(),
        path: uri.path().to_owned(),
        headers: headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect(),
        form: form.clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    match &shared.failure {
        Some(Failure::ServerError) => {
            return stripe_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "An unknown error occurred",
            )
        }
        Some(Failure::Refused(message)) => {
            return stripe_error(
                StatusCode::PAYMENT_REQUIRED,
                "invalid_request_error",
                message,
            )
        }
        None => {}
    }
    shared.created += 1;
    let n = shared.created;
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    match (method, uri.path()) {
        (Method::POST, "/v1/checkout/sessions") => {
            let id = format!("cs_test_a1{n:020}");
            Json(json!({
                "id": id,
                "object": "checkout.session",
                "client_reference_id": field("client_reference_id"),
                "payment_status": "unpaid",
                "url": format!("https://checkout.stripe.example/c/pay/{id}"),
            }))
            .into_response()
        }
        (Method::POST, "/v1/refunds") => Json(json!({
            "id": format!("re_3Q{n:020}"),
            "object": "refund",
            "payment_intent": field("payment_intent"),
            "status": "succeeded",
        }))
        .into_response(),
        _ => stripe_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "Unrecognized request URL.",
        ),
    }
}
