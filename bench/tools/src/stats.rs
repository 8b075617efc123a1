//! Latency figures the way the scripts report them.

/// The `p` quantile (0 < p <= 1) of `sorted` by nearest rank; 0 when empty.
pub fn nearest_rank(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}
