//! What the pages show of the ledger: an account's lots, usage and
//! payments; a host owner's earnings; revenue and what is owed, for admins.
