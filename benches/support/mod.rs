//! What the benches share.

/// Deterministic, incompressible-looking bytes (xorshift64* from `seed`), so
/// runs compare.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// 64 MiB under `cargo bench`; 1 MiB when `cargo test` runs each bench once, unoptimized.
pub fn big_size() -> usize {
    if std::env::args().any(|a| a == "--bench") {
        64 << 20
    } else {
        1 << 20
    }
}
