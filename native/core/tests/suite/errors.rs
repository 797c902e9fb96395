//! What every error carries: a code the TypeScript facade and the README know.

use std::path::PathBuf;
use vit_mae_core::ErrorCode;

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
