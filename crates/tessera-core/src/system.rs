//! The clock and the randomness every crate uses, with one failure rule.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The operating system's random source failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the operating system's random source failed: {0}")]
pub struct RandomError(String);

/// `N` bytes from the operating system's random source, for anything an
/// adversary must not guess (keys, audit choices, canary seeds). Fails
/// rather than falling back to something weaker.
pub fn secret_bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| RandomError(e.to_string()))?;
    Ok(b)
}

/// A number for ids that must not collide but need not be secret (job ids,
/// request ids). The OS source when it works; otherwise a counter mixed
/// with the time, which never repeats within a process.
pub fn unique_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    match secret_bytes::<8>() {
        Ok(b) => u64::from_le_bytes(b),
        Err(_) => {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            mix(now_ms() ^ (u64::from(std::process::id()) << 32) ^ mix(n))
        }
    }
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differ_and_the_clock_moves_forward() {
        assert_ne!(unique_u64(), unique_u64());
        assert!(now_ms() > 1_700_000_000_000);
        assert_ne!(secret_bytes::<16>().unwrap(), [0u8; 16]);
    }
}
