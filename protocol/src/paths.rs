//! The HTTP paths one part calls on another. Both the caller and the router
//! use these constants, so a path is spelled once.

/// Control's internal listener, for gateways (bearer gateway key).
pub mod internal {
    /// What every internal path starts with; the gateway refuses it on the
    /// platform origin, so a request through it can never reach one.
    pub const PREFIX: &str = "/internal/";
    /// `GET ?since=V`: the route table as a stream of
    /// [`WatchMessage`](crate::routes::WatchMessage) lines.
    pub const ROUTES_WATCH: &str = "/internal/v1/routes/watch";
    /// `POST` a [`HealthReport`](crate::reports::HealthReport).
    pub const HEALTH: &str = "/internal/v1/health";
    /// `POST` a [`UsageReport`](crate::reports::UsageReport).
    pub const USAGE: &str = "/internal/v1/usage";
    /// `POST` a [`CertificateRequest`](crate::link::CertificateRequest): the
    /// gateway's client certificate for host links, with the host CA, as a
    /// [`LinkCertificate`](crate::link::LinkCertificate).
    pub const LINK_CERTIFICATE: &str = "/internal/v1/link-certificate";
    /// `GET`: a [`BalanceNotice`](crate::reports::BalanceNotice) for the
    /// owner of session `{sid}` (what Lab's banner says).
    pub const SESSION_BALANCE: &str = "/internal/v1/sessions/{sid}/balance";

    pub fn session_balance(sid: &str) -> String {
        SESSION_BALANCE.replace("{sid}", sid)
    }
}

/// Control's public listener, for host agents (`Authorization: HostKey`);
/// the conversation is described in [`crate::agent`].
pub mod agent {
    /// `POST` an [`AgentHello`](crate::agent::AgentHello): the host announces itself.
    pub const REGISTER: &str = "/agent/v1/register";
    /// `POST` a [`Heartbeat`](crate::agent::Heartbeat) every few seconds.
    pub const HEARTBEAT: &str = "/agent/v1/heartbeat";
    /// `GET ?after=ID`: long-polls for a
    /// [`CommandBatch`](crate::agent::CommandBatch).
    pub const COMMANDS: &str = "/agent/v1/commands";
    /// `POST` an [`AgentEvent`](crate::agent::AgentEvent).
    pub const EVENTS: &str = "/agent/v1/events";
    /// `POST` a [`CertificateRequest`](crate::link::CertificateRequest): a
    /// new host link certificate before the current one runs out.
    pub const LINK_CERTIFICATE: &str = "/agent/v1/link-certificate";
}

/// Entering a session (see ARCHITECTURE "Entering a session").
pub mod enter {
    /// On the session origin, served by the gateway: `?ticket=…` redeems a
    /// ticket for the session cookie.
    pub const TICKET: &str = "/_oc/enter";
    /// On the session origin, served by the gateway to the session's
    /// owner: whether their compute time runs out soon (JSON).
    pub const BALANCE: &str = "/_oc/balance";
    /// On the session origin: the script the gateway adds to Lab's page,
    /// which shows [`BALANCE`]'s warning as a banner.
    pub const BANNER_SCRIPT: &str = "/_oc/banner.js";

    /// On the platform origin, served by control: logs the user in if
    /// needed and sends them back with a fresh ticket.
    pub fn platform_page(sid: &str) -> String {
        format!("/sessions/{sid}/enter")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_internal_path_is_under_the_prefix_the_gateway_refuses() {
        for path in [
            internal::ROUTES_WATCH,
            internal::HEALTH,
            internal::USAGE,
            internal::LINK_CERTIFICATE,
            internal::SESSION_BALANCE,
        ] {
            assert!(path.starts_with(internal::PREFIX), "{path}");
        }
    }
}
