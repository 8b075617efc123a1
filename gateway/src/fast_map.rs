//! The hash map the request path reads.

/// Maps the request path reads: keys come from control or were verified,
/// so a fast seeded hash is enough.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
