//! The class of a request, decided by its `Host` header: the platform
//! origin, a session origin, or a host this gateway does not serve. The
//! proxy routes by it, forwarding edits headers by it, metrics count by it.

/// What kind of request this is, for routing and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Unknown,
    Platform,
    Session,
    Rejected,
}

impl Class {
    /// The `class` label of the request metrics.
    pub fn label(self) -> &'static str {
        match self {
            Class::Unknown => "unknown",
            Class::Platform => "platform",
            Class::Session => "session",
            Class::Rejected => "rejected",
        }
    }
}
