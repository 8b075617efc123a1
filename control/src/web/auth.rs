//! Who is calling the platform: the platform token (a bearer header or the
//! platform cookie) resolved to a live login session and its user, the
//! client's address, and the request context (`Ctx`) every handler sees.
//! A token is only ever trusted after its login session is found live.

use std::net::IpAddr;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use opencloud_protocol::credentials;
use opencloud_protocol::names::FORWARDED_FOR;
use opencloud_protocol::token::{self, Claims, TokenKind};

use super::cookies;
use super::errors::PageError;
use super::layout::Layout;
use crate::accounts::{self, LoggedIn, LoginAttempt, User};
use crate::app::App;
use crate::clock::now_unix;
use crate::error::AppError;
use crate::sessions;

/// What every handler knows about the request: who asks, from where, and
/// the CSRF token its forms must carry.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub user: Option<User>,
    pub login_session: Option<String>,
    pub client_ip: IpAddr,
    pub csrf: String,
    pub user_agent: String,
}

impl Ctx {
    pub fn layout(&self) -> Layout {
        Layout {
            user: self.user.clone(),
            csrf: self.csrf.clone(),
        }
    }

    /// The logged-in user and their login session, or 401.
    pub fn require_user(&self) -> Result<(&User, &str), AppError> {
        match (&self.user, &self.login_session) {
            (Some(user), Some(session)) => Ok((user, session)),
            _ => Err(AppError::Unauthenticated),
        }
    }

    /// The URL that enters the caller's session `sid`, with a ticket signed
    /// now (see [`sessions::enter_url`]), or 401.
    pub fn enter_url(&self, app: &App, sid: &str) -> Result<String, AppError> {
        let (user, login_session) = self.require_user()?;
        Ok(sessions::enter_url(
            &app.config,
            user.id,
            login_session,
            sid,
            now_unix(),
        ))
    }

    /// A host owner (or admin), or 403.
    pub fn require_host_owner(&self) -> Result<&User, AppError> {
        let (user, _) = self.require_user()?;
        if user.may_host() {
            Ok(user)
        } else {
            Err(AppError::Forbidden(
                "My hosts is for host owners. Register as a host owner to rent out a computer."
                    .into(),
            ))
        }
    }

    pub fn require_admin(&self) -> Result<&User, AppError> {
        let (user, _) = self.require_user()?;
        if user.is_admin() {
            Ok(user)
        } else {
            Err(AppError::Forbidden(
                "This page is for administrators.".into(),
            ))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Ctx>()
            .cloned()
            .ok_or_else(|| PageError(AppError::Internal("request context missing".into())))
    }
}

/// The client's address: the peer, or the last `X-Forwarded-For` hop when
/// the peer is a trusted gateway.
pub fn client_ip(app: &App, peer: Option<IpAddr>, headers: &HeaderMap) -> IpAddr {
    let peer = peer.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    if !app.config.trusted_proxies.contains(&peer) {
        return peer;
    }
    headers
        .get_all(FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
        .next_back()
        .unwrap_or(peer)
}

/// Logs the caller in with `email` and `password` (throttled by their
/// address): the new login session and a platform token for it.
pub async fn log_in(
    app: &App,
    ctx: &Ctx,
    email: &str,
    password: &str,
) -> Result<(LoggedIn, String), AppError> {
    let logged_in = accounts::login(
        &app.pool,
        &app.passwords,
        &app.config.login,
        LoginAttempt {
            email,
            password,
            client_ip: ctx.client_ip,
            user_agent: &ctx.user_agent,
        },
    )
    .await?;
    let token = issue_token(app, logged_in.user.id, &logged_in.login_session);
    Ok((logged_in, token))
}

/// Ends the caller's login session, if any: the `Set-Cookie` value that
/// clears the platform cookie.
pub async fn log_out(app: &App, ctx: &Ctx) -> Result<HeaderValue, AppError> {
    if let Some(session) = &ctx.login_session {
        accounts::revoke_login_session(&app.pool, session, "logout").await?;
    }
    Ok(cookies::clear_platform_cookie(app))
}

/// Signs a platform token for a login session, issued now.
pub fn issue_token(app: &App, user_id: u64, login_session: &str) -> String {
    token::sign(
        &app.config.keys,
        &Claims::platform(user_id, login_session, now_unix()),
    )
}

/// The caller as the platform token names them.
#[derive(Default)]
pub struct Caller {
    pub user: Option<User>,
    pub login_session: Option<String>,
    /// The token came from the cookie, not an `Authorization` header: the
    /// CSRF rules for cookies apply, and the cookie may be renewed.
    pub from_cookie: bool,
    /// The token is past half its life: a cookie gets a fresh one.
    past_half_life: bool,
    /// The cookie names no live login (expired, forged, logged out).
    pub stale_cookie: bool,
}

/// Platform tokens refused, by `TokenError` reason.
pub const TOKEN_REJECTIONS: &str = "opencloud_control_token_rejections_total";

/// Resolves the presented token (bearer first, else the cookie) to a live
/// login session and its user. No token, or one that is no good, is an
/// anonymous caller; only a database failure is an error.
pub async fn authenticate(app: &App, headers: &HeaderMap, now: u64) -> Result<Caller, AppError> {
    let bearer = credentials::bearer(headers).map(str::to_owned);
    let from_cookie = bearer.is_none();
    let presented = bearer.or_else(|| cookies::platform_token(app, headers).map(str::to_owned));
    let mut caller = Caller {
        from_cookie,
        ..Caller::default()
    };
    let Some(presented) = presented.filter(|t| !t.is_empty()) else {
        return Ok(caller);
    };
    match token::verify(&app.config.keys, &presented, TokenKind::Platform, now) {
        Ok(claims) => {
            match accounts::authenticate(&app.pool, claims.user_id, &claims.login_session).await? {
                Some(found) => {
                    caller.past_half_life = claims.past_half_life(now);
                    caller.user = Some(found);
                    caller.login_session = Some(claims.login_session);
                }
                None => caller.stale_cookie = from_cookie,
            }
        }
        Err(reason) => {
            metrics::counter!(TOKEN_REJECTIONS, "reason" => reason.reason()).increment(1);
            caller.stale_cookie = from_cookie;
        }
    }
    Ok(caller)
}

/// A cookie past half its life is renewed: the login session is extended
/// and a fresh token set. A failure to extend only logs; the old cookie
/// still works until it expires.
pub async fn renew_past_half_life(app: &App, caller: &Caller) -> Option<HeaderValue> {
    let (Some(user), Some(login_session)) = (&caller.user, &caller.login_session) else {
        return None;
    };
    if !(caller.from_cookie && caller.past_half_life) {
        return None;
    }
    if let Err(e) = accounts::extend_login_session(&app.pool, login_session).await {
        tracing::warn!(error = %e, "could not extend login session");
        return None;
    }
    let fresh = issue_token(app, user.id, login_session);
    Some(cookies::platform_cookie(app, fresh))
}
