//! Tickets are single use per gateway: the first use is remembered until
//! the ticket would have expired anyway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct UsedTickets(Arc<Mutex<HashMap<String, u64>>>);

impl UsedTickets {
    /// True the first time `ticket` is seen; false on any reuse.
    pub fn first_use(&self, ticket: &str, expires_at: u64, now: u64) -> bool {
        let mut used = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if used.len() > 1024 {
            used.retain(|_, expiry| *expiry > now);
        }
        // The MAC (last segment) identifies the ticket; no need to keep all of it.
        let key = ticket.rsplit('.').next().unwrap_or(ticket).to_owned();
        used.insert(key, expires_at).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_works_once() {
        let used = UsedTickets::default();
        assert!(used.first_use("v1.k.p.mac1", 100, 10));
        assert!(!used.first_use("v1.k.p.mac1", 100, 11));
        assert!(used.first_use("v1.k.p.mac2", 100, 11));
    }
}
