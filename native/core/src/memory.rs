//! What the process can allocate, checked before a model or a batch is: an allocation
//! that fails aborts the process (Rust's allocator does not return an error), so a
//! request that cannot fit is refused with `E_OUT_OF_MEMORY` instead.
//!
//! The budget is the memory Linux says can still be handed out without swapping other
//! programs out (`MemAvailable`) plus free swap, no more than what a cgroup (v2) memory
//! limit leaves, and never more than [`ADDRESS_SPACE`]. Where none of it can be read,
//! only that fixed cap applies: impossible sizes still fail, possible ones are tried.

use crate::error::{Error, ErrorCode, Result};

/// The user address space of x86-64 and aarch64 Linux (47 bits): nothing larger can
/// ever be allocated, whatever the machine has.
pub const ADDRESS_SPACE: u128 = 1 << 47;

/// Bytes this process can still allocate (see the module's documentation).
pub fn available() -> u128 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| meminfo_available(&text));
    let cgroup = match (std::fs::read_to_string("/sys/fs/cgroup/memory.max"), std::fs::read_to_string("/sys/fs/cgroup/memory.current")) {
        (Ok(max), Ok(current)) => cgroup_available(&max, &current),
        _ => None,
    };
    [meminfo, cgroup].into_iter().flatten().fold(ADDRESS_SPACE, u128::min)
}

/// `MemAvailable + SwapFree` of `/proc/meminfo`, in bytes.
pub fn meminfo_available(meminfo: &str) -> Option<u128> {
    let field = |name: &str| {
        meminfo.lines().find_map(|line| {
            let kib = line.strip_prefix(name)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim();
            kib.parse::<u128>().ok().map(|k| k * 1024)
        })
    };
    Some(field("MemAvailable")? + field("SwapFree").unwrap_or(0))
}

/// What a cgroup v2 limit leaves (`memory.max` less `memory.current`); `None` when
/// there is no limit (`max`).
pub fn cgroup_available(max: &str, current: &str) -> Option<u128> {
    let max: u128 = max.trim().parse().ok()?;
    let current: u128 = current.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// Refuses a request of `bytes` with `E_OUT_OF_MEMORY` when it is more than
/// [`available`]; `what` says what needs them ("the model needs ... for ...").
pub fn check(bytes: u128, what: impl FnOnce(&str) -> String) -> Result<()> {
    let available = available();
    if bytes > available {
        let message = what(&format_bytes(bytes));
        return Err(Error::new(ErrorCode::OutOfMemory, format!("{message}, more than the {} this process can allocate", format_bytes(available))));
    }
    Ok(())
}

/// Bytes in decimal units with three significant digits: `14.3 TB`, `512 B`.
pub fn format_bytes(bytes: u128) -> String {
    const UNITS: [&str; 9] = ["B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 999.5 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ if value >= 99.95 => format!("{value:.0} {}", UNITS[unit]),
        _ if value >= 9.995 => format!("{value:.1} {}", UNITS[unit]),
        _ => format!("{value:.2} {}", UNITS[unit]),
    }
}
