//! Fast detection of all-zero buffers (the zero chunks that are never stored).

/// Whether every byte of `data` is zero.
///
/// Works on 4 KiB blocks with a branch-free OR inside each block (which the compiler
/// vectorizes) and an early exit between blocks, so non-zero data is rejected quickly and
/// zero data is scanned at memory speed.
pub fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_zero_and_non_zero() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0u8; 10_000]));
        let mut v = vec![0u8; 10_000];
        v[9_999] = 1;
        assert!(!is_zero(&v));
        v[9_999] = 0;
        v[0] = 0x80;
        assert!(!is_zero(&v));
    }
}
