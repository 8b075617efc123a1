//! Names both sides of a request must spell alike: the cookies control and
//! the gateways set and read, and the headers the gateway adds for control.

/// The platform login cookie, set by control on the platform origin
/// (HttpOnly, SameSite=Lax, host-only). The gateway strips it from
/// everything it forwards to a host.
pub const PLATFORM_COOKIE: &str = "oc_session";

/// The session cookie, set by the gateway on one session origin when a
/// ticket is redeemed; never forwarded to the host.
pub const SESSION_COOKIE: &str = "oc_s";

/// The client address the gateway saw; control believes it only from a
/// configured gateway.
pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// The scheme the client used to reach the gateway.
pub const FORWARDED_PROTO: &str = "x-forwarded-proto";
