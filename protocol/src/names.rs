//! Names both sides of a request must spell alike: the cookies control and
//! the gateways set and read, and the headers the gateway adds for control.

/// The platform login cookie, set by control on the platform origin
/// (HttpOnly, SameSite=Lax, host-only). The gateway strips it from
/// everything it forwards to a host.
pub const PLATFORM_COOKIE: &str = "oc_session";

/// The session cookie, set by the gateway on one session origin when a
/// ticket is redeemed; never forwarded to the host.
pub const SESSION_COOKIE: &str = "oc_s";

/// The platform cookie's name on an origin that is `https` or not: on
/// https it takes the `__Host-` prefix, so browsers keep it only if it is
/// Secure, host-only and for path `/` (no sibling origin can set or shadow
/// it).
pub fn platform_cookie(https: bool) -> &'static str {
    if https {
        "__Host-oc_session"
    } else {
        PLATFORM_COOKIE
    }
}

/// [`SESSION_COOKIE`] by the same rule: on https a session's code cannot
/// toss an `oc_s` cookie from a sibling session origin onto another.
pub fn session_cookie(https: bool) -> &'static str {
    if https {
        "__Host-oc_s"
    } else {
        SESSION_COOKIE
    }
}

/// Every name either cookie can have: the gateway strips them all from
/// what it forwards to a host.
pub const ALL_PLATFORM_COOKIES: [&str; 4] = [
    PLATFORM_COOKIE,
    "__Host-oc_session",
    SESSION_COOKIE,
    "__Host-oc_s",
];

/// The client address the gateway saw; control believes it only from a
/// configured gateway.
pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// The scheme the client used to reach the gateway.
pub const FORWARDED_PROTO: &str = "x-forwarded-proto";
