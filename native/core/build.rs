//! Links a static OpenBLAS when the build machine has one (`cfg(openblas)`): on AMD it
//! is the fastest sgemm of the three (bench/RESULTS.md, `src/sgemm.rs`).
//! `OPENBLAS_STATIC_DIR` names the folder of `libopenblas.a`; otherwise the locations of
//! Debian's and Ubuntu's `libopenblas-pthread-dev` and `libopenblas-dev` are tried.
//! `VIT_MAE_NO_OPENBLAS=1` builds with the gemm crate alone. The library is linked
//! statically, so the built addon does not need OpenBLAS where it runs.
//!
//! Links Intel oneMKL's sgemm as well when its static libraries are there (`cfg(mkl)`):
//! `MKL_STATIC_DIR`, else `<repository>/.mkl/lib`, which `native/mkl-static.mjs` fills
//! from PyPI before every `npm run build:native`. `VIT_MAE_NO_MKL=1` builds without it.
//! The three archives depend on each other, which a library crate cannot pass to the
//! final link as a group, so the objects that `sgemm` and `MKL_CBWR_Set` need are
//! partially linked (`ld -r`, the same resolution a final link does, nothing altered)
//! into one object in `$OUT_DIR/libvit_mae_mkl.a`. Its symbols do not clash with
//! OpenBLAS's: the engine calls OpenBLAS as `cblas_sgemm` and MKL as `sgemm` (Fortran),
//! and the addon exports neither. `src/sgemm.rs` picks one at run time.
//!
//! With the `cuda` feature, also compiles the fused ops' kernels (src/cuda/kernels.cu) to
//! PTX with nvcc (`$NVCC`, else `$CUDA_ROOT/bin/nvcc` or `$CUDA_PATH/bin/nvcc`, else `nvcc`
//! on the PATH), for virtual architecture `compute_$CUDA_COMPUTE_CAP` (default 80: the
//! driver JIT-compiles it for Ampere, Hopper and newer), into `$OUT_DIR/kernels.ptx`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    compile_cuda_kernels();
    link_mkl();
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
             GEMMs on non-Intel CPUs use MKL, or the gemm crate without it, both slower there"
        ),
    }
}

fn link_mkl() {
    const LIBRARIES: [&str; 3] = ["libmkl_intel_lp64.a", "libmkl_sequential.a", "libmkl_core.a"];
    println!("cargo:rustc-check-cfg=cfg(mkl)");
    println!("cargo:rerun-if-env-changed=MKL_STATIC_DIR");
    println!("cargo:rerun-if-env-changed=VIT_MAE_NO_MKL");
    if std::env::var_os("VIT_MAE_NO_MKL").is_some_and(|v| v != "0") {
        return;
    }
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let dir = std::env::var_os("MKL_STATIC_DIR").map(PathBuf::from).unwrap_or_else(|| manifest.join("../../.mkl/lib"));
    println!("cargo:rerun-if-changed={}", dir.display());
    if !LIBRARIES.iter().all(|l| dir.join(l).is_file()) {
        println!(
            "cargo:warning=no static MKL in {} (run `node native/mkl-static.mjs` or set MKL_STATIC_DIR): \
             GEMMs on Intel CPUs use OpenBLAS, slower than PyTorch's MKL",
            dir.display()
        );
        return;
    }
    for library in LIBRARIES {
        println!("cargo:rerun-if-changed={}", dir.join(library).display());
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("vit_mae_mkl.o");
    let run = |command: &mut Command| {
        let status = command.status().unwrap_or_else(|e| panic!("could not run {command:?} to link MKL: {e}"));
        assert!(status.success(), "{command:?} failed to link MKL ({status})");
    };
    run(Command::new("ld")
        .args(["-r", "-o"])
        .arg(&object)
        .args(["-u", "sgemm", "-u", "MKL_CBWR_Set", "--start-group"])
        .args(LIBRARIES.map(|l| dir.join(l)))
        .arg("--end-group"));
    let archive = out.join("libvit_mae_mkl.a");
    let _ = std::fs::remove_file(&archive);
    run(Command::new("ar").arg("crs").arg(&archive).arg(&object));
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=vit_mae_mkl");
    for library in ["m", "dl", "pthread"] {
        println!("cargo:rustc-link-lib=dylib={library}");
    }
    println!("cargo:rustc-cfg=mkl");
}

fn compile_cuda_kernels() {
    const SOURCE: &str = "src/cuda/kernels.cu";
    println!("cargo:rerun-if-changed={SOURCE}");
    for var in ["NVCC", "CUDA_ROOT", "CUDA_PATH", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC").map(PathBuf::from).unwrap_or_else(|| {
        ["CUDA_ROOT", "CUDA_PATH"]
            .iter()
            .filter_map(std::env::var_os)
            .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
            .find(|path| path.is_file())
            .unwrap_or_else(|| PathBuf::from("nvcc"))
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").ok().map(|c| c.trim().replace('.', "")).filter(|c| !c.is_empty()).unwrap_or_else(|| "80".into());
    if !cap.chars().all(|c| c.is_ascii_digit()) {
        panic!("CUDA_COMPUTE_CAP={cap:?}: expected a compute capability such as 80");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels.ptx");
    // No --use_fast_math: the kernels need the exact erff, expf, sqrtf and division.
    let status = Command::new(&nvcc)
        .args(["--ptx", &format!("-arch=compute_{cap}"), "-O3", "-std=c++17", "-o"])
        .arg(&out)
        .arg(SOURCE)
        .status()
        .unwrap_or_else(|e| panic!("could not run {} to compile {SOURCE} (set NVCC or CUDA_ROOT): {e}", nvcc.display()));
    if !status.success() {
        panic!("{} failed to compile {SOURCE} ({status})", nvcc.display());
    }
}
