//! Refusing work that cannot fit in memory before it starts. Rust aborts the process when an
//! allocation fails, so a batch too large for the machine has to be caught by an estimate, not
//! by an error from the allocator.

/// Caps the memory this program plans to use, in MiB (for shared servers; also how tests
/// exercise the refusal on any machine).
pub const LIMIT_VAR: &str = "AWNET_MEMORY_LIMIT_MIB";

/// Bytes the kernel can give without swapping (`MemAvailable` of `/proc/meminfo`), lowered to
/// [`LIMIT_VAR`] when that is set; `None` where neither is known.
pub fn available_bytes() -> Option<u64> {
    let limit = std::env::var(LIMIT_VAR)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|mib| mib << 20);
    let free = std::fs::read_to_string("/proc/meminfo").ok().and_then(|info| {
        let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    match (free, limit) {
        (Some(f), Some(l)) => Some(f.min(l)),
        (f, l) => f.or(l),
    }
}

/// `Err` with a message for the user when `need` bytes for `what` exceed what is available.
/// Where the available memory is unknown, nothing is refused.
pub fn check(need: u64, what: &str) -> Result<(), String> {
    match available_bytes() {
        Some(free) if need > free => Err(format!(
            "{what} needs about {} of memory and {} is available; use a smaller batch",
            gib(need),
            gib(free)
        )),
        _ => Ok(()),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absurd_need_is_refused_with_both_sizes_and_a_small_one_is_not() {
        if available_bytes().is_none() {
            return;
        }
        let err = check(u64::MAX / 2, "the test").unwrap_err();
        assert!(
            err.starts_with("the test needs about ") && err.contains("GiB is available"),
            "{err}"
        );
        assert!(check(1 << 20, "the test").is_ok());
    }
}
