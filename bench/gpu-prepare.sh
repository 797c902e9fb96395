#!/usr/bin/env bash
# Builds what bench/gpu.sh runs on a GPU machine that has no Rust toolchain, here,
# without a GPU: the benchmark (bench/bench.rs) and the core's test binary, for its parity
# tests (native/core/tests/suite/parity.rs, and the dense features' in features.rs), with
# `--features cuda`, into .gpu/ at the repository root (gpu.sh reads the repository's own
# test/fixtures where it runs):
#
#   .gpu/bin/bench.xz, .gpu/bin/parity.xz  stripped, xz-compressed (gpu.sh unpacks them)
#   .gpu/fixtures/                         a copy of the PyTorch fixtures (../shared/fixtures
#                                          or $VIT_MAE_FIXTURES)
#   .gpu/BUILD_INFO                        commit, date, toolchain
#
#   bash bench/gpu-prepare.sh
#
# The CUDA toolchain comes from native/cuda-toolchain.sh (CUDA 13.0 wheels, PTX for
# compute_80, which the driver JIT-compiles for Hopper). Builds go to
# $CARGO_TARGET_DIR (default target/cuda), without OpenBLAS (VIT_MAE_NO_OPENBLAS=1:
# smaller binaries, and the GPU runs the GEMMs). .gpu/ must be ignored by git (it is
# carried to the GPU machine as an ignored path, e.g. the device tool's carry: [".gpu"]).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

if [[ -f .cuda/env.sh ]]; then
  # shellcheck disable=SC1091
  source .cuda/env.sh
else
  eval "$(native/cuda-toolchain.sh)"
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target/cuda}
export VIT_MAE_NO_OPENBLAS=1
fixtures=${VIT_MAE_FIXTURES:-$repo/../shared/fixtures}
[[ -f $fixtures/README.md || -n "$(ls "$fixtures"/*.safetensors 2>/dev/null)" ]] || { echo "no fixtures in $fixtures" >&2; exit 1; }

# The executables cargo reports for a build (`--message-format=json`), by target name.
executable() {
  python3 -c '
import json, sys
name, path = sys.argv[1], ""
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == name and msg.get("executable"):
        path = msg["executable"]
print(path)' "$1"
}

echo "gpu-prepare: building the bench example and the parity tests with --features cuda in $CARGO_TARGET_DIR" >&2
bench=$(cargo build --release -p vit-mae-core --features cuda --example bench --message-format=json-render-diagnostics | executable bench)
parity=$(cargo test --release -p vit-mae-core --features cuda --test suite --no-run --message-format=json-render-diagnostics | executable suite)
[[ -x $bench && -x $parity ]] || { echo "gpu-prepare: build artifacts not found ($bench, $parity)" >&2; exit 1; }

rm -rf .gpu
mkdir -p .gpu/bin
for pair in "bench:$bench" "parity:$parity"; do
  name=${pair%%:*} path=${pair#*:}
  strip -o ".gpu/bin/$name" "$path"
  xz -T0 -6 -f ".gpu/bin/$name"
done
cp -r "$fixtures" .gpu/fixtures
{
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo " (uncommitted changes)" || true)
  echo "commit $commit$dirty, built $(date -u '+%Y-%m-%d %H:%M') UTC"
  echo "$(nvcc --version | grep -o 'release [0-9.]*' | sed 's/release/CUDA/'), CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-?}, $(rustc --version)"
} >.gpu/BUILD_INFO

if ! git check-ignore -q .gpu/BUILD_INFO; then
  echo "gpu-prepare: NOTE: .gpu/ is not ignored by git; add '/.gpu' to .gitignore (the device tool carries only ignored paths)" >&2
fi
tree_kb=$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
gpu_kb=$(du -sk .gpu | cut -f1)
du -sh .gpu/bin/* .gpu/fixtures | sed 's/^/  /'
echo "gpu-prepare: .gpu is $((gpu_kb / 1024)) MiB, the working tree $((tree_kb / 1024)) MiB: $(((gpu_kb + tree_kb) / 1024)) MiB of the 64 MiB a device run may carry"
echo "gpu-prepare: on the GPU machine, from the repository root: bash bench/gpu.sh"
