//! The start gate: at most `limit` Jupyter servers start at once on a host,
//! and the rest wait their turn, first come first served. A burst of opens
//! on a small host then gives the first users Lab soonest instead of making
//! everyone slow together (see "Paced starts and the warm pool" in
//! `docs/decisions.md`).
//!
//! Two queues: users' starts, and refills of the warm pool. A refill only
//! gets a turn when no user's start waits: it is for a later user, never at
//! the cost of one waiting now. A pass is given back when dropped (also
//! when its holder is cancelled), and handed straight to the next in line,
//! so the count of servers starting never exceeds the limit.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Who is asking to start a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A user's start: first come first served.
    User,
    /// A warm server for the pool: after every waiting user.
    Refill,
}

/// The gate; cheap to clone.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Mutex<State>>,
}

struct State {
    limit: usize,
    /// Passes out now.
    in_flight: usize,
    users: VecDeque<oneshot::Sender<Pass>>,
    refills: VecDeque<oneshot::Sender<Pass>>,
}

/// The right to start one server; given back when dropped.
pub struct Pass {
    gate: Option<Gate>,
}

impl Drop for Pass {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            gate.release();
        }
    }
}

impl Gate {
    /// A gate letting `limit` (at least 1) through at once.
    pub fn new(limit: u32) -> Self {
        Self {
            inner: Arc::new(Mutex::new(State {
                limit: limit.max(1) as usize,
                in_flight: 0,
                users: VecDeque::new(),
                refills: VecDeque::new(),
            })),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every change below leaves the state whole before it can panic.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for a pass. The place in line is taken when this is first
    /// polled, so calls polled in some order are served in that order.
    pub async fn enter(&self, priority: Priority) -> Pass {
        loop {
            let turn = {
                let mut state = self.state();
                let nobody_ahead = match priority {
                    Priority::User => state.users.is_empty(),
                    Priority::Refill => state.users.is_empty() && state.refills.is_empty(),
                };
                if nobody_ahead && state.in_flight < state.limit {
                    state.in_flight += 1;
                    return Pass {
                        gate: Some(self.clone()),
                    };
                }
                let (tx, rx) = oneshot::channel();
                match priority {
                    Priority::User => state.users.push_back(tx),
                    Priority::Refill => state.refills.push_back(tx),
                }
                rx
            };
            self.publish();
            let pass = turn.await;
            self.publish();
            // A queued sender is always sent a pass; were one ever dropped,
            // the waiter would simply queue again.
            if let Ok(pass) = pass {
                return pass;
            }
        }
    }

    /// Hands a returned pass to the next in line, or frees its place.
    fn release(&self) {
        let mut state = self.state();
        loop {
            let next = match state.users.pop_front() {
                Some(next) => next,
                None => match state.refills.pop_front() {
                    Some(next) => next,
                    None => {
                        state.in_flight -= 1;
                        return;
                    }
                },
            };
            let pass = Pass {
                gate: Some(self.clone()),
            };
            match next.send(pass) {
                Ok(()) => return,
                // That waiter gave up: the pass goes to the one after it.
                Err(mut pass) => pass.gate = None,
            }
        }
    }

    /// Users' starts waiting now.
    pub fn users_waiting(&self) -> usize {
        self.state().users.len()
    }

    /// Passes out now.
    pub fn in_flight(&self) -> usize {
        self.state().in_flight
    }

    fn publish(&self) {
        metrics::gauge!(STARTS_WAITING).set(self.users_waiting() as f64);
    }
}

/// Users' starts waiting at the gate (refills are not counted: nobody waits for them).
pub const STARTS_WAITING: &str = "opencloud_agent_starts_waiting";

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Six users enter in order; each holds its pass until told to go on.
    #[tokio::test]
    async fn starts_go_in_arrival_order_and_never_more_than_the_limit() {
        let gate = Gate::new(2);
        let order = Arc::new(Mutex::new(Vec::new()));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut releases = Vec::new();
        let mut tasks = Vec::new();
        for n in 0..6 {
            let (go, hold) = oneshot::channel::<()>();
            releases.push(go);
            let (gate, order, peak) = (gate.clone(), order.clone(), peak.clone());
            // Entered here, in this order, before the next one is made.
            let entering = {
                let gate = gate.clone();
                async move { gate.enter(Priority::User).await }
            };
            let mut entering = Box::pin(entering);
            let first = futures_poll_once(&mut entering).await;
            tasks.push(tokio::spawn(async move {
                let pass = match first {
                    Some(pass) => pass,
                    None => entering.await,
                };
                order.lock().unwrap().push(n);
                peak.fetch_max(gate.in_flight(), Ordering::SeqCst);
                let _ = hold.await;
                drop(pass);
            }));
        }
        tokio::task::yield_now().await;
        assert_eq!(gate.users_waiting(), 4);
        // Let them go one at a time; the next in line follows each.
        for go in releases {
            let _ = go.send(());
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        assert_eq!(gate.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_refill_waits_for_every_user_even_one_who_came_later() {
        let gate = Gate::new(1);
        let holder = gate.enter(Priority::User).await;
        let mut refill = Box::pin(gate.enter(Priority::Refill));
        assert!(futures_poll_once(&mut refill).await.is_none());
        let mut user = Box::pin(gate.enter(Priority::User));
        assert!(futures_poll_once(&mut user).await.is_none());
        drop(holder);
        let user_pass = user.await;
        assert!(futures_poll_once(&mut refill).await.is_none());
        drop(user_pass);
        let _refill_pass = refill.await;
        assert_eq!(gate.in_flight(), 1);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_passes_its_turn_on() {
        let gate = Gate::new(1);
        let holder = gate.enter(Priority::User).await;
        let mut quitter = Box::pin(gate.enter(Priority::User));
        assert!(futures_poll_once(&mut quitter).await.is_none());
        let mut next = Box::pin(gate.enter(Priority::User));
        assert!(futures_poll_once(&mut next).await.is_none());
        drop(quitter);
        drop(holder);
        let pass = next.await;
        assert_eq!(gate.in_flight(), 1);
        drop(pass);
        assert_eq!(gate.in_flight(), 0);
    }

    /// Polls a future once: its output if it is ready at once.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
