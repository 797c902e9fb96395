#!/bin/sh
# The core's cargo tests, as `npm test` runs them: the whole suite, with each reader of
# untrusted files fuzzed for 30 s (tests/suite/fuzz.rs, 5 s by default), then the engine,
# parity, training and allocation tests once more on each linked BLAS (VIT_MAE_GEMM),
# with OpenBLAS choosing its own kernels (OPENBLAS_CORETYPE unset).
#
# `napi build` (npm install) passes `--target <host>`, which puts its artifacts in
# target/<host>/. Naming the same target, and the binding's package beside the core's
# so that cargo unifies dependency features as that build does, lets the tests reuse
# every compiled dependency instead of building all of them again in target/release/.
set -eu
host=$(rustc -vV | sed -n 's/^host: //p')
cargo_test="cargo test --release --target $host -p vit-mae-core -p vit-mae-node"
VIT_MAE_FUZZ_SECONDS=${VIT_MAE_FUZZ_SECONDS:-30} $cargo_test
for gemm in mkl openblas; do
  VIT_MAE_GEMM=$gemm env -u OPENBLAS_CORETYPE $cargo_test --test suite -- engine:: parity:: train:: finetune::
  VIT_MAE_GEMM=$gemm env -u OPENBLAS_CORETYPE $cargo_test --test allocations
done
