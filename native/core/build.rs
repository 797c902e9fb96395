//! Links a static OpenBLAS when the build machine has one (`cfg(openblas)`): its
//! sgemm is 5-35% faster than the gemm crate's on this model's shapes (bench/RESULTS.md).
//! `OPENBLAS_STATIC_DIR` names the folder of `libopenblas.a`; otherwise the locations of
//! Debian's and Ubuntu's `libopenblas-pthread-dev` and `libopenblas-dev` are tried.
//! `VIT_MAE_NO_OPENBLAS=1` builds with the gemm crate alone. The library is linked
//! statically, so the built addon does not need OpenBLAS where it runs.

use std::path::PathBuf;

fn main() {
    println!("cargo:rustc-check-cfg=cfg(openblas)");
    println!("cargo:rerun-if-env-changed=OPENBLAS_STATIC_DIR");
    println!("cargo:rerun-if-env-changed=VIT_MAE_NO_OPENBLAS");
    if std::env::var_os("VIT_MAE_NO_OPENBLAS").is_some_and(|v| v != "0") {
        return;
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let candidates: Vec<PathBuf> = match std::env::var_os("OPENBLAS_STATIC_DIR") {
        Some(dir) => vec![dir.into()],
        None if os == "linux" => [format!("/usr/lib/{arch}-linux-gnu/openblas-pthread"), format!("/usr/lib/{arch}-linux-gnu")]
            .into_iter()
            .map(PathBuf::from)
            .collect(),
        None => Vec::new(),
    };
    match candidates.iter().find(|dir| dir.join("libopenblas.a").is_file()) {
        Some(dir) => {
            println!("cargo:rerun-if-changed={}", dir.join("libopenblas.a").display());
            println!("cargo:rustc-link-search=native={}", dir.display());
            println!("cargo:rustc-link-lib=static=openblas");
            println!("cargo:rustc-cfg=openblas");
        }
        None => println!(
            "cargo:warning=no static OpenBLAS found (install libopenblas-pthread-dev or set OPENBLAS_STATIC_DIR): \
             GEMMs use the gemm crate, which trains about 7-13% slower"
        ),
    }
}
