//! What every error carries: a code the TypeScript facade and the README know, and a
//! message of one statement.

use std::path::PathBuf;
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
