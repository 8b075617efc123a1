//! A session's state as its row stores it (`sessions.state`), mapped to and
//! from the column here and nowhere else. It is finer than the route
//! table's [`SessionState`]: `stopping` shows as a tombstone while the
//! agent stops the server, and `failed` as a stopped session.
//!
//! Invariant: a session is live (holds a place on its host and its
//! project's `live_project_id`) exactly while it is starting, running or
//! stopping; every other state is final.

use std::sync::LazyLock;

use opencloud_protocol::routes::SessionState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
    Lost,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Starting,
        Phase::Running,
        Phase::Stopping,
        Phase::Stopped,
        Phase::Failed,
        Phase::Lost,
    ];

    /// The `sessions.state` value.
    pub fn as_column(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
            Phase::Lost => "lost",
        }
    }

    pub fn from_column(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_column() == raw)
    }

    /// Holds a place on its host (and its project's live session slot).
    pub fn is_live(self) -> bool {
        matches!(self, Phase::Starting | Phase::Running | Phase::Stopping)
    }

    /// Its owner can go in (or wait at the door).
    pub fn is_enterable(self) -> bool {
        matches!(self, Phase::Starting | Phase::Running)
    }

    /// What the route table carries for a session in this state.
    pub fn route_state(self) -> SessionState {
        match self {
            Phase::Starting => SessionState::Starting,
            Phase::Running => SessionState::Running,
            Phase::Lost => SessionState::Lost,
            Phase::Stopping | Phase::Stopped | Phase::Failed => SessionState::Stopped,
        }
    }

    /// The row state a route state is stored as.
    pub fn from_route(state: SessionState) -> Self {
        match state {
            SessionState::Starting => Phase::Starting,
            SessionState::Running => Phase::Running,
            SessionState::Lost => Phase::Lost,
            SessionState::Stopped => Phase::Stopped,
        }
    }
}

/// The route state of a `sessions.state` value; one this binary does not
/// know reads as stopped.
pub fn route_state(column: &str) -> SessionState {
    Phase::from_column(column).map_or(SessionState::Stopped, Phase::route_state)
}

/// True for a `sessions.state` value of a live session.
pub fn is_live_column(column: &str) -> bool {
    Phase::from_column(column).is_some_and(Phase::is_live)
}

/// The live states as an SQL list, for `state IN ({})`.
pub fn live_sql() -> &'static str {
    static LIST: LazyLock<String> = LazyLock::new(|| {
        Phase::ALL
            .into_iter()
            .filter(|p| p.is_live())
            .map(|p| format!("'{}'", p.as_column()))
            .collect::<Vec<_>>()
            .join(", ")
    });
    &LIST
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_column_values() {
        for phase in Phase::ALL {
            assert_eq!(Phase::from_column(phase.as_column()), Some(phase));
        }
        for state in [
            SessionState::Starting,
            SessionState::Running,
            SessionState::Lost,
            SessionState::Stopped,
        ] {
            assert_eq!(route_state(Phase::from_route(state).as_column()), state);
        }
        assert_eq!(route_state("unheard_of"), SessionState::Stopped);
    }

    #[test]
    fn live_states_are_the_ones_on_a_host() {
        assert_eq!(live_sql(), "'starting', 'running', 'stopping'");
        assert!(is_live_column("stopping"));
        assert!(!is_live_column("failed"));
        assert!(!Phase::Stopping.route_state().is_live(), "a tombstone");
    }
}
