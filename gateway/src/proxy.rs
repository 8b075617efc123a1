//! The gateway as one `ProxyHttp`: everything a request learns lives in its
//! [`RequestCtx`], filled by the phases in order. The `Host` header decides
//! the class: the platform origin goes to control, `{sid}.{session_domain}`
//! to that session's Jupyter server, anything else is refused.

use std::borrow::Cow;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header;
use opencloud_protocol::credentials;
use opencloud_protocol::names;
use opencloud_protocol::paths;
use opencloud_protocol::reports::BalanceNotice;
use opencloud_protocol::routes::{HostState, SessionState, SID_LEN};
use opencloud_protocol::token::{self, Claims, TokenKind};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpUpstreamRequestPolicy;
use pingora::{Error, ErrorType, Result};

use crate::banner;
use crate::class::Class;
use crate::clock::unix_now;
use crate::config::Config;
use crate::connections::{Admission, OpenConnections, Registration};
use crate::control_client::ControlClient;
use crate::deadline::is_answer_timeout;
use crate::forwarding::Forwarding;
use crate::hardening::{check_raw_head, plain_body_framing, MAX_HEADER_BYTES, REJECTED_REQUESTS};
use crate::health::HostHealth;
use crate::host_link;
use crate::link_certificate::ClientCredentials;
use crate::pages::{page, starting_page, OWN_ANSWER_HEADERS};
use crate::table::{HostLink, RouteTable, Routes, SessionKey};
use crate::tickets::UsedTickets;
use crate::usage::UsageBook;
use crate::verified::VerifiedTokens;
use std::sync::Arc;

/// How long after entering a session its route may still be on its way.
const ROUTE_ARRIVAL_SECONDS: u64 = 30;

/// A session origin's sid, decoded (the table's key) and as the host name
/// spells it (compared with the sid in signed claims without decoding them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionName {
    pub key: SessionKey,
    text: [u8; SID_LEN],
}

impl SessionName {
    fn parse(label: &[u8]) -> Option<Self> {
        Some(SessionName {
            key: SessionKey::parse(label)?,
            text: label.try_into().ok()?,
        })
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.text).expect("a parsed sid is ASCII")
    }
}

/// Tickets and session credentials refused, by `kind` and `reason`: a
/// [`token::TokenError`]'s, or one of [`CREDENTIAL_REFUSALS`].
pub const TOKEN_REJECTIONS: &str = "opencloud_gateway_token_rejections_total";
const TICKET: &str = "ticket";
const SESSION: &str = "session";
/// The `kind`s of [`TOKEN_REJECTIONS`].
pub const TOKEN_KINDS: [&str; 2] = [TICKET, SESSION];
const WRONG_SID: &str = "wrong_sid";
const REVOKED: &str = "revoked";
const REUSED: &str = "reused";
/// Why a credential with a good token is refused all the same.
pub const CREDENTIAL_REFUSALS: [&str; 3] = [WRONG_SID, REVOKED, REUSED];
/// No session credential at all: asked to log in, not counted.
const MISSING: &str = "missing";

/// Changes and upgrades refused for their `Origin`, by `reason`.
pub const ORIGIN_REFUSALS: &str = "opencloud_gateway_origin_refusals_total";
const NO_ORIGIN: &str = "missing";
const FOREIGN_ORIGIN: &str = "foreign";
/// The `reason`s of [`ORIGIN_REFUSALS`].
pub const ORIGIN_REFUSAL_REASONS: [&str; 2] = [NO_ORIGIN, FOREIGN_ORIGIN];

/// Per-request state, filled phase by phase.
pub struct RequestCtx {
    pub class: Class,
    pub started: Instant,
    pub client_ip: Option<IpAddr>,
    pub sid: Option<SessionName>,
    /// Seconds since the epoch when the session's credentials were checked.
    unix_time: u64,
    pub user_id: Option<u64>,
    /// The session's host link, when the request goes to a session.
    upstream: Option<(HostLink, SessionName)>,
    upstream_host: Option<u64>,
    /// The cookie or token that admitted a session request.
    claims: Option<Arc<Claims>>,
    /// In the open-request registry while connected upstream.
    connection: Option<Registration>,
    is_upgrade: bool,
    /// A request body follows the head.
    has_body: bool,
    /// Lab's page: the banner's script tag goes at its end.
    add_banner: bool,
}

pub struct Gateway {
    pub config: Config,
    pub routes: Routes,
    pub used_tickets: UsedTickets,
    pub health: HostHealth,
    pub usage: UsageBook,
    pub metrics: RequestMetrics,
    pub verified: VerifiedTokens,
    pub connections: OpenConnections,
    /// What host links present and trust.
    pub link_credentials: ClientCredentials,
    /// Asked for Lab's compute-time banner.
    pub control: ControlClient,
}

/// Request counters and latency histograms, registered once per label set
/// so the request path only bumps atomics.
#[derive(Default)]
pub struct RequestMetrics {
    counters: std::sync::Mutex<std::collections::HashMap<(Class, u16), metrics::Counter>>,
    cached: [std::sync::OnceLock<(metrics::Counter, metrics::Histogram)>; 4],
}

impl RequestMetrics {
    fn observe(&self, class: Class, status: u16, elapsed: Duration) {
        let slot = class as usize;
        // The usual case (200 for this class) needs no lock at all.
        let (ok, histogram) = self.cached[slot].get_or_init(|| {
            (
                metrics::counter!("opencloud_gateway_requests_total", "class" => class.label(), "status" => "200"),
                metrics::histogram!("opencloud_gateway_request_duration_seconds", "class" => class.label()),
            )
        });
        histogram.record(elapsed.as_secs_f64());
        if status == 200 {
            ok.increment(1);
            return;
        }
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        counters
            .entry((class, status))
            .or_insert_with(|| {
                metrics::counter!("opencloud_gateway_requests_total", "class" => class.label(), "status" => status.to_string())
            })
            .increment(1);
    }
}

impl Gateway {
    fn classify(&self, host: &[u8]) -> (Class, Option<SessionName>) {
        if host == self.config.platform_host.as_bytes() {
            return (Class::Platform, None);
        }
        if let Some(label) = self.config.session_domain.session_label(host) {
            // Exactly one fixed-length label: a sid that is a prefix of
            // another can never match it.
            return (Class::Session, SessionName::parse(label));
        }
        (Class::Rejected, None)
    }

    fn enter_url(&self, sid: SessionName) -> String {
        let page = paths::enter::platform_page(sid.as_str());
        format!("{}{page}", self.config.public_origin)
    }

    /// Handles `/_oc/enter?ticket=…`: verify, refuse reuse, set `oc_s`,
    /// send the browser to Lab.
    async fn enter(&self, session: &mut Session, sid: SessionName) -> Result<bool> {
        let query = session.req_header().uri.query().unwrap_or("").to_owned();
        let ticket = query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == "ticket")
            .map(|(_, v)| v.to_owned())
            .unwrap_or_default();
        let now = unix_now();
        let table = self.routes.load();
        let verdict = token::verify(&self.config.keys, &ticket, TokenKind::Ticket, now)
            .map_err(|e| e.reason())
            .and_then(|claims| {
                if !claims_for(&claims, sid) {
                    Err(WRONG_SID)
                } else if table.is_revoked(&claims.login_session) {
                    Err(REVOKED)
                } else if !self.used_tickets.first_use(&ticket, claims.expires_at, now) {
                    Err(REUSED)
                } else {
                    Ok(claims)
                }
            });
        let claims = match verdict {
            Ok(claims) => claims,
            Err(reason) => {
                metrics::counter!(TOKEN_REJECTIONS, "kind" => TICKET, "reason" => reason)
                    .increment(1);
                let html = page(
                    "This link has expired",
                    "Links that open a session work once and for one minute. Open the project again from OpenCloud.",
                    Some((&self.enter_url(sid), "Open it again")),
                );
                return respond(session, 403, &[], html).await;
            }
        };
        let cookie_token = token::sign(&self.config.keys, &Claims::session_cookie(&claims, now));
        let cookie = format!(
            "{}={cookie_token}; Path=/; HttpOnly; SameSite=Lax{}",
            names::session_cookie(self.config.https),
            if self.config.https { "; Secure" } else { "" }
        );
        respond(
            session,
            302,
            &[
                ("set-cookie", cookie.as_str()),
                ("location", "/lab"),
                ("cache-control", "no-store"),
            ],
            String::new(),
        )
        .await
    }

    /// Who is asking on a session origin: the `oc_s` cookie for this sid, or
    /// a platform bearer token.
    fn session_user(
        &self,
        table: &RouteTable,
        req: &RequestHeader,
        sid: SessionName,
        now: u64,
    ) -> Result<Arc<Claims>, &'static str> {
        let check = |claims: Arc<Claims>| {
            if table.is_revoked(&claims.login_session) {
                Err(REVOKED)
            } else {
                Ok(claims)
            }
        };
        let cookie_name = names::session_cookie(self.config.https);
        if let Some(value) = credentials::cookie_bytes(&req.headers, cookie_name) {
            let claims = self
                .verified
                .verify(&self.config.keys, value, TokenKind::SessionCookie, now)
                .map_err(|e| e.reason())?;
            if !claims_for(&claims, sid) {
                return Err(WRONG_SID);
            }
            return check(claims);
        }
        if let Some(bearer) = credentials::bearer(&req.headers) {
            let claims = self
                .verified
                .verify(
                    &self.config.keys,
                    bearer.as_bytes(),
                    TokenKind::Platform,
                    now,
                )
                .map_err(|e| e.reason())?;
            return check(claims);
        }
        Err(MISSING)
    }

    /// Why a request authenticated by `oc_s` may not go on, if it may not:
    /// every session origin is on one site, so SameSite lets pages of other
    /// sessions send the cookie; a change or an upgrade must name the
    /// session's own origin (browsers send `Origin` on both). Reads pass
    /// without looking at the header.
    fn origin_refusal(
        &self,
        req: &RequestHeader,
        upgrade: bool,
        sid: SessionName,
    ) -> Option<&'static str> {
        let method = &req.method;
        let safe = method == http::Method::GET
            || method == http::Method::HEAD
            || method == http::Method::OPTIONS;
        if safe && !upgrade {
            return None;
        }
        let Some(origin) = req.headers.get(header::ORIGIN) else {
            return Some(NO_ORIGIN);
        };
        let own = self.config.session_domain.is_origin_of(
            self.config.https,
            &sid.text,
            origin.as_bytes(),
        );
        (!own).then_some(FOREIGN_ORIGIN)
    }

    /// Placed but not ready: pages wait on a page that reloads itself, API
    /// calls are told to retry.
    async fn starting(&self, session: &mut Session, ctx: &RequestCtx) -> Result<bool> {
        if is_navigation(session.req_header(), ctx.is_upgrade) {
            return respond(
                session,
                200,
                &[("cache-control", "no-store")],
                starting_page(),
            )
            .await;
        }
        respond_text(session, 503, "the session is starting; retry in a second\n").await
    }

    /// `/_oc/balance` for the session's owner (already checked): control's
    /// word on their compute time, or no warning when control cannot say.
    async fn balance(&self, session: &mut Session, sid: SessionName) -> Result<bool> {
        let notice = match self.control.session_balance(sid.as_str()).await {
            Ok(notice) => notice,
            Err(e) => {
                tracing::debug!(error = %e, "balance notice unavailable");
                BalanceNotice {
                    warning: None,
                    packages_url: format!("{}/packages", self.config.public_origin),
                }
            }
        };
        let body = Bytes::from(serde_json::to_vec(&notice).unwrap_or_default());
        let headers = [("cache-control", "no-store")];
        answer(session, 200, "application/json", &headers, body).await
    }

    async fn route_session(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let Some(sid) = ctx.sid else {
            return no_session_here(session).await;
        };
        if session.req_header().uri.path() == paths::enter::TICKET {
            return self.enter(session, sid).await;
        }
        let now = unix_now();
        ctx.unix_time = now;
        let table = self.routes.load();
        let claims = match self.session_user(&table, session.req_header(), sid, now) {
            Ok(claims) => claims,
            Err(reason) => {
                if reason != MISSING {
                    metrics::counter!(TOKEN_REJECTIONS, "kind" => SESSION, "reason" => reason)
                        .increment(1);
                }
                if is_navigation(session.req_header(), ctx.is_upgrade) {
                    let location = self.enter_url(sid);
                    return respond(
                        session,
                        302,
                        &[
                            ("location", location.as_str()),
                            ("cache-control", "no-store"),
                        ],
                        String::new(),
                    )
                    .await;
                }
                return respond_text(session, 401, "log in to OpenCloud to use this session\n")
                    .await;
            }
        };
        if claims.kind == TokenKind::SessionCookie {
            if let Some(reason) = self.origin_refusal(session.req_header(), ctx.is_upgrade, sid) {
                metrics::counter!(ORIGIN_REFUSALS, "reason" => reason).increment(1);
                return respond_text(
                    session,
                    403,
                    "refused: changes and WebSockets in this session must come from the session's own page\n",
                )
                .await;
            }
        }
        let user = claims.user_id;
        ctx.user_id = Some(user);
        let Some(route) = table.sessions.get(&sid.key).filter(|s| s.owner == user) else {
            // A cookie for this very sid, minted moments ago from a ticket
            // control signed after creating the session: its route is on
            // its way, so wait for it like for a starting server.
            let just_entered = claims.kind == TokenKind::SessionCookie
                && now.saturating_sub(claims.issued_at) <= ROUTE_ARRIVAL_SECONDS;
            if just_entered {
                return self.starting(session, ctx).await;
            }
            // Someone else's session answers exactly like a missing one.
            return no_session_here(session).await;
        };
        let back = || format!("{}/projects", self.config.public_origin);
        let ended = match route.state {
            SessionState::Lost => Some((
                "This session's host went offline",
                "The computer serving this session stopped answering. Your project can be opened again on another host.",
            )),
            SessionState::Stopped => Some((
                "This session has ended",
                "Open the project again to start a new session.",
            )),
            SessionState::Starting | SessionState::Running => None,
        };
        if let Some((title, text)) = ended {
            let html = page(title, text, Some((&back(), "Back to my projects")));
            return respond(session, 410, &[], html).await;
        }
        if route.state == SessionState::Starting {
            return self.starting(session, ctx).await;
        }
        match session.req_header().uri.path() {
            paths::enter::BALANCE => return self.balance(session, sid).await,
            paths::enter::BANNER_SCRIPT => {
                let script = Bytes::from_static(banner::SCRIPT.as_bytes());
                let cache = [("cache-control", "public, max-age=3600")];
                return answer(
                    session,
                    200,
                    "text/javascript; charset=utf-8",
                    &cache,
                    script,
                )
                .await;
            }
            _ => {}
        }
        let Some((host, link)) = table
            .hosts
            .get(&route.host)
            .and_then(|h| Some((&h.route, h.link.as_ref()?)))
        else {
            let html = page(
                "Host unknown",
                "This session's host is not known to this gateway yet. Try again in a moment.",
                None,
            );
            return respond(session, 503, &[], html).await;
        };
        if host.state == HostState::Offline || !self.health.is_up(host.id) {
            let html = page(
                "This session's host is offline",
                "The computer serving this session is not reachable right now.",
                Some((&back(), "Back to my projects")),
            );
            return respond(session, 503, &[], html).await;
        }
        ctx.upstream = Some((link.clone(), sid));
        ctx.upstream_host = Some(host.id);
        ctx.claims = Some(claims);
        Ok(false)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    /// No downstream modules: the gateway never compresses, and Pingora's
    /// default adds a disabled compression module to every request.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            class: Class::Unknown,
            started: Instant::now(),
            client_ip: None,
            sid: None,
            unix_time: 0,
            user_id: None,
            upstream: None,
            upstream_host: None,
            claims: None,
            connection: None,
            is_upgrade: false,
            has_body: true,
            add_banner: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        ctx.client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.is_upgrade = session.is_upgrade_req();
        let raw_head = session
            .as_downstream()
            .as_http1()
            .map(|h1| h1.get_headers_raw_bytes());
        if let Some(raw) = raw_head {
            let framing = plain_body_framing(&session.req_header().headers);
            // Not plain: chunked, or refused by the raw check just below.
            ctx.has_body = framing.unwrap_or(true);
            let checked = if raw.len() > MAX_HEADER_BYTES || framing.is_none() {
                check_raw_head(&raw)
            } else {
                Ok(())
            };
            if let Err(refusal) = checked {
                ctx.class = Class::Rejected;
                metrics::counter!(REJECTED_REQUESTS, "reason" => refusal.reason).increment(1);
                session.set_keepalive(None);
                return respond_text(session, refusal.status, &format!("{}\n", refusal.reason))
                    .await;
            }
        }
        // An absolute-form target must name the host the request is for.
        if let Some(authority) = session.req_header().uri.authority() {
            let host_header = session
                .req_header()
                .headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok());
            if host_header.is_some_and(|h| !h.eq_ignore_ascii_case(authority.as_str())) {
                ctx.class = Class::Rejected;
                return respond_text(session, 400, "the request target names another host\n").await;
            }
        }
        let host = request_host(session.req_header());
        let (class, sid) = self.classify(&host);
        ctx.class = class;
        ctx.sid = sid;
        match class {
            Class::Platform => {
                let path = session.req_header().uri.path();
                if path.starts_with(paths::internal::PREFIX) || path == "/metrics" {
                    return respond(
                        session,
                        404,
                        &[],
                        page("Not found", "There is nothing at this address.", None),
                    )
                    .await;
                }
                Ok(false)
            }
            Class::Session => self.route_session(session, ctx).await,
            Class::Rejected | Class::Unknown => {
                ctx.class = Class::Rejected;
                respond_text(session, 421, "this server does not serve that host name\n").await
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let mut peer = match (ctx.class, &ctx.upstream) {
            (Class::Platform, _) => HttpPeer::new(self.config.control_public, false, String::new()),
            (Class::Session, Some((link, sid))) => {
                // Only a gateway that has just started waits here.
                let Some(credentials) = self
                    .link_credentials
                    .wait(self.config.connect_timeout)
                    .await
                else {
                    host_link::refused("no_client_certificate");
                    return Err(Error::explain(
                        ErrorType::ConnectError,
                        "no host link client certificate from control yet",
                    ));
                };
                host_link::peer(
                    link,
                    ctx.upstream_host.unwrap_or_default(),
                    (sid.as_str(), sid.key),
                    &credentials,
                )
            }
            _ => {
                return Err(Error::explain(
                    ErrorType::InternalError,
                    "no upstream chosen",
                ))
            }
        };
        peer.options.connection_timeout = Some(self.config.connect_timeout);
        // Answers must come in time (WebSockets may stay quiet for long).
        // The client's stream times requests without a body (the deadline
        // module); Pingora may stop reading a client whose body the host
        // does not take, so those keep Pingora's timer on every read.
        peer.options.read_timeout =
            (!ctx.is_upgrade && ctx.has_body).then_some(self.config.read_timeout);
        // The same rules, applied by `Forwarding` in the pass it makes anyway.
        peer.options.http_upstream_request_policy = HttpUpstreamRequestPolicy::preserve();
        // No idle timeout on pooled upstream connections: Pingora would arm a
        // timer for every connection it puts back, that is every request.
        // Jupyter closes idle ones itself, and the pool notices.
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // Pingora's case-preserving header calls parse every name and keep
        // a second map; editing the plain `http` parts costs a fraction.
        // Only a target the URI does not reproduce (absolute-form) is kept
        // aside and put back.
        let verbatim_target = (upstream.raw_path()
            != upstream
                .uri
                .path_and_query()
                .map_or(&b""[..], |p| p.as_str().as_bytes()))
        .then(|| upstream.raw_path().to_vec());
        let placeholder = RequestHeader::from(http::Request::new(()).into_parts().0);
        let mut parts: http::request::Parts = std::mem::replace(upstream, placeholder).into();
        let forwarding = Forwarding {
            class: ctx.class,
            client_ip: ctx.client_ip,
            https: self.config.https,
            http11: session.req_header().version == http::Version::HTTP_11,
        };
        let edited = forwarding.apply(&mut parts.headers);
        *upstream = RequestHeader::from(parts);
        edited?;
        if let Some(target) = verbatim_target {
            upstream.set_raw_path(&target)?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if ctx.is_upgrade && response.status.as_u16() == 101 {
            metrics::gauge!("opencloud_gateway_active_websockets").increment(1.0);
        }
        if on_tls(session) {
            response.insert_header(header::STRICT_TRANSPORT_SECURITY, HSTS)?;
        }
        if ctx.class == Class::Session
            && ctx.upstream.is_some()
            && session.req_header().method == http::Method::GET
            && banner::is_lab_page(session.req_header().uri.path(), response)
        {
            ctx.add_banner = true;
            response.remove_header(&header::CONTENT_LENGTH);
        }
        if ctx.class == Class::Session && response.headers.contains_key(header::SET_COOKIE) {
            // A host may not set cookies for other origins.
            let kept: Vec<http::HeaderValue> = response
                .headers
                .get_all(header::SET_COOKIE)
                .iter()
                .filter(|v| !sets_domain(v.as_bytes()))
                .cloned()
                .collect();
            if kept.len() != response.headers.get_all(header::SET_COOKIE).iter().count() {
                response.remove_header(&header::SET_COOKIE);
                for value in kept {
                    response.append_header(header::SET_COOKIE, value)?;
                }
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<Duration>> {
        if ctx.add_banner {
            banner::append_at_end(body, end_of_stream);
        }
        Ok(None)
    }

    /// A session request goes only to the certificate the route table pins
    /// for its host, and stays open only while the route table would still
    /// admit it (the `connections` module ends it otherwise).
    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some((link, _)) = &ctx.upstream {
            host_link::check_pin(digest, &link.pinned)?;
        }
        let (Some(claims), Some(sid), Some(host)) = (&ctx.claims, ctx.sid, ctx.upstream_host)
        else {
            return Ok(());
        };
        let admission = Admission {
            claims: claims.clone(),
            sid: sid.key,
            host,
        };
        // A retry connects again: the earlier connection leaves first.
        ctx.connection = None;
        let registration = self
            .connections
            .register(fd, admission, &self.routes)
            .map_err(|e| Error::explain(ErrorType::InternalError, e.to_string()))?;
        ctx.connection = Some(registration);
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        e: Box<Error>,
    ) -> Box<Error> {
        // Passive health: the next request learns at once that the host is down.
        if let Some(host) = ctx.upstream_host {
            self.health.mark(host, false);
            if e.etype() == &ErrorType::TLSHandshakeFailure {
                host_link::refused(host_link::handshake_refusal(&e));
            }
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        // The client hung up: nobody is left to answer, and it was no bad
        // request (logged with status 0, as Pingora does).
        let client_gone = e.esource() == &pingora::ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            )
            && !is_answer_timeout(e);
        if client_gone {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let (code, title, message) = match e.etype() {
            ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectError
            | ErrorType::ConnectNoRoute => {
                // The platform's upstream is control: no host.
                let host = ctx.upstream_host.map(|h| h.to_string()).unwrap_or_default();
                metrics::counter!("opencloud_gateway_upstream_connect_errors_total", "class" => ctx.class.label(), "host" => host).increment(1);
                (
                    502,
                    "Not answering",
                    "The server behind this address is not answering. Try again in a moment.",
                )
            }
            _ if e.etype() == &ErrorType::ReadTimedout || is_answer_timeout(e) => {
                (504, "Timed out", "The server took too long to answer.")
            }
            ErrorType::HTTPStatus(code) => (
                *code,
                "Request refused",
                "The request could not be handled.",
            ),
            ErrorType::InvalidHTTPHeader if e.esource() == &pingora::ErrorSource::Downstream => (
                400,
                "Bad request",
                innermost_context(e).unwrap_or("The request's headers were refused."),
            ),
            _ => match e.esource() {
                pingora::ErrorSource::Downstream => {
                    (400, "Bad request", "The request could not be read.")
                }
                _ => (
                    502,
                    "Upstream error",
                    "The server behind this address failed to answer.",
                ),
            },
        };
        if ctx.class == Class::Session && code >= 500 {
            let sid = ctx.sid.as_ref().map_or("", SessionName::as_str);
            tracing::warn!(%sid, error = %e, "session upstream failed");
        }
        // Mid-response there is no status left to send: the connection closes.
        let written = if session.response_written().is_some() {
            Err(())
        } else {
            respond(session, code, &[], page(title, message, None))
                .await
                .map_err(|_| ())
        };
        FailToProxy {
            error_code: if written.is_ok() { code } else { 0 },
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        // The request is over: nothing of it is left to close.
        ctx.connection = None;
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        if let (Class::Session, Some(sid), Some(_)) = (ctx.class, ctx.sid, ctx.upstream_host) {
            let bytes_in = session.body_bytes_read() as u64;
            let bytes_out = session.body_bytes_sent() as u64;
            // A WebSocket was active until it closed, just now.
            let active_at = if ctx.is_upgrade {
                unix_now()
            } else {
                ctx.unix_time
            };
            self.usage.record(sid.key, active_at, bytes_in, bytes_out);
        }
        if ctx.is_upgrade && status == 101 {
            metrics::gauge!("opencloud_gateway_active_websockets").decrement(1.0);
        }
        self.metrics
            .observe(ctx.class, status, ctx.started.elapsed());
    }
}

/// The explanation of the error Pingora wrapped in others (it adds the peer
/// on the way out), which for a refused request tells the client why.
fn innermost_context(e: &Error) -> Option<&str> {
    let mut current = e;
    // Pingora keeps the wrapped error boxed, as its own `root_cause` expects.
    while let Some(inner) = current
        .cause
        .as_deref()
        .and_then(|c| c.downcast_ref::<Box<Error>>())
    {
        current = inner;
    }
    current.context.as_ref().map(|c| c.as_str())
}

/// The Host header (or the authority of an absolute-form target), lower case.
fn request_host(req: &RequestHeader) -> Cow<'_, [u8]> {
    // Compared byte for byte with ASCII names: anything else matches none.
    let host = req
        .headers
        .get(header::HOST)
        .map(|v| v.as_bytes())
        .or_else(|| req.uri.authority().map(|a| a.as_str().as_bytes()))
        .unwrap_or_default()
        .trim_ascii();
    if host.iter().any(u8::is_ascii_uppercase) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Whether a cookie or ticket's claims name this session. A sid has one
/// spelling only, so comparing the text is comparing the sessions.
fn claims_for(claims: &Claims, sid: SessionName) -> bool {
    claims.sid.as_deref().map(str::as_bytes) == Some(&sid.text[..])
}

/// A page navigation (redirect to log in) rather than an API or WebSocket
/// call (401).
fn is_navigation(req: &RequestHeader, upgrade: bool) -> bool {
    if upgrade || req.method != http::Method::GET {
        return false;
    }
    let header = |name: &str| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    match header("sec-fetch-mode") {
        "" => header("accept").contains("text/html"),
        mode => mode == "navigate",
    }
}

fn sets_domain(set_cookie: &[u8]) -> bool {
    String::from_utf8_lossy(set_cookie)
        .split(';')
        .skip(1)
        .any(|attr| attr.trim().to_ascii_lowercase().starts_with("domain"))
}

/// The answer for a missing session and for someone else's alike.
async fn no_session_here(session: &mut Session) -> Result<bool> {
    let html = page("Not found", "There is no session at this address.", None);
    respond(session, 404, &[], html).await
}

/// Writes a complete page and ends the request.
async fn respond(
    session: &mut Session,
    status: u16,
    headers: &[(&str, &str)],
    html: String,
) -> Result<bool> {
    let body = Bytes::from(html);
    answer(session, status, "text/html; charset=utf-8", headers, body).await
}

async fn respond_text(session: &mut Session, status: u16, text: &str) -> Result<bool> {
    let body = Bytes::copy_from_slice(text.as_bytes());
    answer(session, status, "text/plain; charset=utf-8", &[], body).await
}

/// Browsers keep to https for a year once they saw this on an https answer
/// (they ignore it on http). Not `includeSubDomains`: the platform's name
/// need not be the parent of every name under it.
const HSTS: &str = "max-age=31536000";

/// Whether the client reached the gateway over TLS.
fn on_tls(session: &Session) -> bool {
    session
        .digest()
        .is_some_and(|digest| digest.ssl_digest.is_some())
}

/// Writes a complete response, with the headers of the gateway's own
/// answers, and ends the request. Boxed: the gateway's
/// own answers are the exception, and unboxed their futures (kilobytes of
/// Pingora's writers) would sit in every request's `request_filter`
/// future, which Pingora allocates and fills per request.
fn answer<'a>(
    session: &'a mut Session,
    status: u16,
    content_type: &'static str,
    headers: &'a [(&'a str, &'a str)],
    body: Bytes,
) -> BoxFuture<'a, Result<bool>> {
    Box::pin(async move {
        let mut response =
            ResponseHeader::build(status, Some(headers.len() + OWN_ANSWER_HEADERS.len() + 2))?;
        if !body.is_empty() {
            response.insert_header(header::CONTENT_TYPE, content_type)?;
        }
        response.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        for (name, value) in OWN_ANSWER_HEADERS.iter().chain(headers) {
            response.append_header(name.to_string(), value.to_string())?;
        }
        if on_tls(session) {
            response.insert_header(header::STRICT_TRANSPORT_SECURITY, HSTS)?;
        }
        session
            .write_response_header(Box::new(response), body.is_empty())
            .await?;
        if !body.is_empty() {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_cookie_with_a_domain_is_recognised() {
        assert!(sets_domain(b"a=1; Path=/; Domain=nb.localhost"));
        assert!(sets_domain(b"a=1; domain=.x"));
        assert!(!sets_domain(b"_xsrf=1; Path=/"));
        assert!(
            !sets_domain(b"domain=1; Path=/"),
            "a cookie named domain is fine"
        );
    }

    #[test]
    fn claims_name_a_session_by_its_one_spelling() {
        let sid = opencloud_protocol::routes::new_sid();
        let name = SessionName::parse(sid.as_bytes()).unwrap();
        assert_eq!(name.as_str(), sid);
        let mut claims = Claims::platform(1, "ls", 100);
        assert!(!claims_for(&claims, name));
        claims.sid = Some(sid.clone());
        assert!(claims_for(&claims, name));
        claims.sid = Some(opencloud_protocol::routes::new_sid());
        assert!(!claims_for(&claims, name));
    }
}
