//! Money: what customers buy and use, and what host owners earn.
//!
//! The rooms: [`ledger`] (lots of compute time and the append-only entries
//! that move them: grants, purchases, usage, expiry, refunds, earnings,
//! payouts), [`orders`] (buying a package, the provider's webhooks applied
//! exactly once, refunds), [`providers`] (the `PaymentProvider` trait, the
//! sandbox and Stripe), [`webhook`] (Stripe's event format and signature,
//! which the sandbox speaks too), [`reports`] (what pages show: an
//! account's lots, usage and payments, a host owner's earnings, revenue)
//! and [`money`] (amounts in words).
//!
//! Money is counted in micro units, millionths of the currency's minor
//! unit, so a second of compute carries its exact share of the price and
//! every sum adds up; payments themselves are whole minor units.

pub mod ledger;
pub mod money;
pub mod orders;
pub mod providers;
pub mod reports;
pub mod webhook;
