//! What every error carries: a code the TypeScript facade and the README know, and a
//! message of one statement; and the memory budget that `E_OUT_OF_MEMORY` is measured by.

use std::path::PathBuf;
use vit_mae_core::memory::{cgroup_available, format_bytes, meminfo_available, ADDRESS_SPACE};
use vit_mae_core::{Error, ErrorCode};

fn repository_file(path: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_code_is_known_to_the_facade_and_documented() {
    let errors_ts = repository_file("ts/errors.ts");
    let readme = repository_file("README.md");
    for code in ErrorCode::ALL {
        let code = code.as_str();
        assert!(errors_ts.contains(&format!("  '{code}',")), "ts/errors.ts: ERROR_CODES lacks {code}");
        assert!(errors_ts.contains(&format!(" * - `{code}`: ")), "ts/errors.ts: ErrorCode's documentation lacks {code}");
        assert!(readme.contains(&format!("`{code}`")), "README.md does not name {code}");
    }
}

#[test]
fn candle_errors_become_one_line_without_their_backtrace() {
    // What candle builds when RUST_BACKTRACE is set: the error, then the frames.
    let traced = candle_core::Error::WithBacktrace {
        inner: Box::new(candle_core::Error::Msg("unexpected rank, expected: 4, got: 3".to_string())),
        backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
    };
    assert!(traced.to_string().lines().count() > 1, "the test needs candle's multi-line form");
    let e = Error::from(traced.context("reading pos_embed"));
    assert_eq!(e.code, ErrorCode::Internal);
    assert_eq!(e.message, "tensor operation failed: reading pos_embed: unexpected rank, expected: 4, got: 3");
}

#[test]
fn the_memory_budget_is_available_memory_and_swap_within_the_cgroup_limit() {
    let meminfo = "MemTotal:       24683772 kB\nMemFree:        19987896 kB\nMemAvailable:   22683696 kB\nSwapTotal:       1048576 kB\nSwapFree:         524288 kB\n";
    assert_eq!(meminfo_available(meminfo), Some((22_683_696 + 524_288) * 1024));
    assert_eq!(meminfo_available("MemAvailable:   1000 kB\n"), Some(1_024_000), "no swap line: no swap");
    assert_eq!(meminfo_available("MemTotal: 1000 kB\n"), None);
    assert_eq!(cgroup_available("max\n", "123\n"), None);
    assert_eq!(cgroup_available("1000000\n", "400000\n"), Some(600_000));
    assert_eq!(cgroup_available("1000\n", "4000\n"), Some(0));
    let now = vit_mae_core::memory::available();
    assert!(now > 0 && now <= ADDRESS_SPACE, "{now}");
}

#[test]
fn sizes_are_written_in_decimal_units() {
    let cases: [(u128, &str); 8] = [
        (0, "0 B"),
        (999, "999 B"),
        (1_000, "1.00 kB"),
        (14_300_000_000_000, "14.3 TB"),
        (576_001_503_006_656, "576 TB"),
        (999_600_000, "1.00 GB"),
        (ADDRESS_SPACE, "141 TB"),
        (u128::MAX, "340282366920938 YB"),
    ];
    for (bytes, want) in cases {
        assert_eq!(format_bytes(bytes), want, "{bytes}");
    }
}
