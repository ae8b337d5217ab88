//! What the storage examples share.

/// Numeric command-line argument `i`, or `default` when it is absent.
pub fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .map(|a| {
            a.parse()
                .unwrap_or_else(|_| panic!("argument {i} ({a}) must be a number"))
        })
        .unwrap_or(default)
}
