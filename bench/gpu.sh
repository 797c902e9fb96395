#!/usr/bin/env bash
# The GPU benchmark, in one command on a machine with an NVIDIA GPU, its driver and
# PyTorch (no cargo, no node, no network): from the repository root, after
# bench/gpu-prepare.sh built .gpu/ elsewhere,
#
#   bash bench/gpu.sh
#
# 1. CUDA parity: the parity tests (.gpu/bin/parity) on the GPU against the fixtures in
#    test/fixtures and .gpu/fixtures, f32 and bf16 (tolerances in
#    native/core/tests/suite/parity.rs), and the dense features (the maps against
#    PyTorch, the simple pyramid; native/core/tests/suite/features.rs).
# 2. The single-GEMM peak (8192^3 bf16, cuBLAS through candle and through PyTorch).
# 3. MAE pre-training steps (forward, backward, AdamW; bf16 mixed precision) at 224:
#    mae_vit_base_patch16 at batch 256 and mae_vit_large_patch16 at batch 128, vit-mae
#    (.gpu/bin/bench) and then PyTorch eager (bench/reference.py: bf16 autocast,
#    scaled_dot_product_attention, torch.optim.AdamW), each under bench/memwatch.py for
#    its peak GPU memory (NVML, device-wide, from before the process started).
# 4. A 2-process NCCL data-parallel step, on a machine with 2 GPUs or more and mpirun
#    (else recorded as skipped, saying why): mae_vit_base_patch16 at batch 256 per rank,
#    2 ranks of .gpu/bin/bench under mpirun (--distributed mpi: each rank on the GPU of its
#    local rank, gradients averaged with one NCCL all-reduce per step), its images/s over
#    both ranks against step 3's single process, and whether both ranks' final weights
#    agree. NCCL: VIT_MAE_NCCL_LIBRARY is pointed at the nvidia/nccl/lib/libnccl.so.2 of
#    $PYTHON's site-packages when there is one (pip install nvidia-nccl-cu13).
# 5. A table: images/s, their ratio, MFU (model matmul FLOPs / 989 TFLOP/s, the H200's
#    dense bf16 peak; and against the best measured GEMM peak) and peak GPU memory.
#
# Everything is printed; with $OUT set the table goes to $OUT/gpu-results.md, the
# raw JSON to $OUT/gpu-results.json and every step's log to $OUT/logs/. Every step has
# a timeout and the whole run a budget (GPU_BENCH_BUDGET_S, default 450 s), so a hang
# cannot eat a lease; a failing step is recorded and the rest still run.
#
# Environment: PYTHON (default /opt/torch/.venv/bin/python3, else python3), whose
# site-packages' nvidia/*/lib folders provide libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10, libnvrtc.so.13 for the vit-mae binaries; STEPS (timed steps per
# workload, default 10, after 2 warm-up steps); WORKLOADS (default "base224 large224").
set -u
export RUST_BACKTRACE=0 # the binaries are stripped: a backtrace would be all <unknown>
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start_s=$SECONDS
budget=${GPU_BENCH_BUDGET_S:-450}
steps=${STEPS:-10}
workloads=${WORKLOADS:-base224 large224}
gpu=.gpu
out=${OUT:-$gpu/out}
logs=$out/logs
mkdir -p "$logs"

python=${PYTHON:-/opt/torch/.venv/bin/python3}
[[ -x $python ]] || python=$(command -v python3)
say() { printf '\n=== %s (%ds)\n' "$*" $((SECONDS - start_s)); }

# Seconds a step may take: its own limit, but never past the budget (less 15 s for the table).
limit() {
  local left=$((budget - (SECONDS - start_s) - 15))
  (( left < $1 )) && echo $((left > 5 ? left : 5)) || echo "$1"
}

# run NAME LIMIT CMD...: CMD under memwatch and a timeout, output to the terminal and logs/NAME.log.
run() {
  local name=$1 t; t=$(limit "$2"); shift 2
  say "$name (timeout ${t}s): $*"
  if (( budget - (SECONDS - start_s) < 20 )); then
    echo "skipped: the ${budget}s budget is spent" | tee "$logs/$name.log"
    return 0
  fi
  "$python" bench/memwatch.py -- timeout -k 10 "$t" "$@" 2>&1 | tee "$logs/$name.log"
  local rc=${PIPESTATUS[0]}
  (( rc == 124 || rc == 137 )) && echo "!!! $name timed out after ${t}s"
  (( rc != 0 )) && echo "!!! $name exited with $rc"
  return 0
}

say "machine"
nvidia-smi -L || echo "nvidia-smi -L failed"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
[[ -f $gpu/BUILD_INFO ]] && cat "$gpu/BUILD_INFO"
"$python" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")' \
  || echo "!!! PyTorch not importable with $python"

# The CUDA libraries vit-mae links (by soname), from PyTorch's nvidia-* wheels.
site=$("$python" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
libdirs=
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
  found=$(find $site -path '*nvidia*' -name "$lib" 2>/dev/null | head -1)
  if [[ -n $found ]]; then
    dir=$(dirname "$found")
    [[ ":$libdirs:" == *":$dir:"* ]] || libdirs=$libdirs${libdirs:+:}$dir
  else
    echo "!!! $lib not found under $site"
  fi
done
export LD_LIBRARY_PATH=$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
# candle's kernels are PTX for compute_80, JIT-compiled by the driver on first use; keep them all cached.
export CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-1073741824}

# The binaries travel xz-compressed (their embedded PTX shrinks ~10x); unpacked for this run only.
mkdir -p "$gpu/run"
trap 'rm -rf "$gpu/run"' EXIT
for bin in bench parity; do
  if [[ -f $gpu/bin/$bin.xz ]]; then
    "$python" -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' "$gpu/bin/$bin.xz" "$gpu/run/$bin"
  elif [[ -f $gpu/bin/$bin ]]; then
    cp "$gpu/bin/$bin" "$gpu/run/$bin"
  else
    echo "!!! $gpu/bin/$bin(.xz) missing: run bench/gpu-prepare.sh where cargo is and carry .gpu"
  fi
  [[ -f $gpu/run/$bin ]] && chmod +x "$gpu/run/$bin"
done
ldd "$gpu/run/bench" 2>&1 | grep -E 'cuda|cublas|curand|nvrtc|not found' || true

say "1. CUDA parity against the fixtures"
parity=FAIL
if [[ -x $gpu/run/parity ]]; then
  t=$(limit 150)
  VIT_MAE_TEST_DEVICE=cuda VIT_MAE_REPO_FIXTURES=$PWD/test/fixtures VIT_MAE_FIXTURES=$PWD/$gpu/fixtures timeout -k 10 "$t" "$gpu/run/parity" \
    parity:: features::the_maps_match_pytorch features::the_simple_pyramid 2>&1 | tee "$logs/parity.log"
  rc=${PIPESTATUS[0]}
  (( rc == 0 )) && parity=PASS
  (( rc == 124 || rc == 137 )) && parity="FAIL (timed out after ${t}s)"
fi
echo "parity: $parity"
echo "$parity" >"$logs/parity.status"

say "2. single-GEMM peak, 8192^3 bf16"
run ours-gemm 60 "$gpu/run/bench" --device cuda --precision bf16 gemm
run torch-gemm 60 "$python" bench/reference.py --device cuda --precision bf16 gemm 0

say "3. MAE pre-training at 224, bf16, $steps timed steps after 2 warm-up steps"
for w in $workloads; do
  run "ours-$w" 150 "$gpu/run/bench" --device cuda --precision bf16 "$w" "$steps" train
  run "torch-$w" 150 "$python" bench/reference.py --device cuda --precision bf16 "$w" "$steps" "$(nproc)" train
done

say "4. 2-process NCCL data-parallel step"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
mpirun=$(command -v mpirun || true)
skipped=
if (( gpus < 2 )); then
  skipped="it needs 2 GPUs, this machine has $gpus"
elif [[ -z $mpirun ]]; then
  skipped="it needs mpirun (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev)"
elif [[ ! -x $gpu/run/bench ]]; then
  skipped="$gpu/bin/bench is missing"
fi
if [[ -n $skipped ]]; then
  echo "skipped: $skipped" | tee "$logs/dp-base224.log"
else
  nccl=$(find $site -path '*nvidia/nccl/lib/libnccl.so.2' 2>/dev/null | head -1)
  if [[ -n $nccl ]]; then
    export VIT_MAE_NCCL_LIBRARY=$nccl
  else
    echo "no nvidia/nccl/lib/libnccl.so.2 under $site: NCCL is looked for as libnccl.so.2 (pip install nvidia-nccl-cu13)"
  fi
  echo "VIT_MAE_NCCL_LIBRARY=${VIT_MAE_NCCL_LIBRARY:-}"
  run dp-base224 240 "$mpirun" --allow-run-as-root -n 2 "$gpu/run/bench" --device cuda --precision bf16 --distributed mpi base224 "$steps" train
fi

say "5. summary"
OUT_DIR=$out WORKLOADS_LIST=$workloads PARITY=$parity "$python" - <<'EOF'
import datetime, json, os

out, logs = os.environ["OUT_DIR"], os.path.join(os.environ["OUT_DIR"], "logs")

def read(name):
    """(benchmark JSON, memwatch JSON) from a step's log; {} where missing."""
    result, mem = {}, {}
    try:
        lines = open(os.path.join(logs, name + ".log"), errors="replace").read().splitlines()
    except OSError:
        return result, mem
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if "peak_gpu_mem_mb" in obj:
            mem = obj
        elif "workload" in obj:
            result = obj
    return result, mem

def num(x, fmt="{:.1f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else "n/a"

def pct(x):
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"

ours_gemm, _ = read("ours-gemm")
torch_gemm, _ = read("torch-gemm")
peaks = [g["tflops"] for g in (ours_gemm, torch_gemm) if isinstance(g.get("tflops"), (int, float))]
gemm_peak = max(peaks) if peaks else None
raw = {"parity": os.environ["PARITY"], "gemm": {"vit-mae": ours_gemm, "pytorch": torch_gemm}, "workloads": {}}
rows, verdicts = [], []
for w in os.environ["WORKLOADS_LIST"].split():
    ours, ours_mem = read("ours-" + w)
    ref, ref_mem = read("torch-" + w)
    raw["workloads"][w] = {"vit-mae": {**ours, "memwatch": ours_mem}, "pytorch": {**ref, "memwatch": ref_mem}}
    a, b = ours.get("train"), ref.get("train")
    ta, tb = ours.get("train_tflops"), ref.get("train_tflops")
    # Memory only of runs that finished.
    ma = ours_mem.get("peak_gpu_mem_mb") if a is not None else None
    mb = ref_mem.get("peak_gpu_mem_mb") if b is not None else None
    ok = lambda *xs: all(isinstance(x, (int, float)) and x for x in xs)  # noqa: E731
    rows.append("| {} (batch {}) | {} | {} | {} | {} / {} | {} / {} | {} / {} | {} |".format(
        w, ours.get("batch", ref.get("batch", "?")),
        num(a), num(b), f"{a / b:.2f}x" if ok(a, b) else "n/a",
        pct(ta / 989 if ok(ta) else None), pct(tb / 989 if ok(tb) else None),
        pct(ta / gemm_peak if ok(ta, gemm_peak) else None), pct(tb / gemm_peak if ok(tb, gemm_peak) else None),
        num(ma, "{:.0f}"), num(mb, "{:.0f}"), f"{ma / mb:.2f}x" if ok(ma, mb) else "n/a"))
    # The issue's targets: >= 1.3x PyTorch's images/s, >= 50% MFU on ViT-B, peak memory no higher than PyTorch's.
    met = lambda c: "n/a" if c is None else ("met" if c else "NOT met")  # noqa: E731
    goals = [f">= 1.3x PyTorch: {met(a / b >= 1.3 if ok(a, b) else None)}",
             f"memory <= PyTorch: {met(ma <= mb if ok(ma, mb) else None)}"]
    if w == "base224":
        goals.insert(1, f">= 50% MFU: {met(ta / 989 >= 0.5 if ok(ta) else None)}")
    verdicts.append(f"- {w}: " + "; ".join(goals))

# The data-parallel step: one JSON line per rank, or a line saying why it was skipped.
try:
    dp_lines = open(os.path.join(logs, "dp-base224.log"), errors="replace").read().splitlines()
except OSError:
    dp_lines = []
dp_ranks = []
for line in dp_lines:
    try:
        obj = json.loads(line.strip()) if line.strip().startswith("{") else {}
    except ValueError:
        obj = {}
    if "rank" in obj and "workload" in obj:
        dp_ranks.append(obj)
dp_skipped = next((line for line in dp_lines if line.startswith("skipped: ")), None)
single = raw["workloads"].get("base224", {}).get("vit-mae", {}).get("train")
if dp_skipped:
    dp_md = f"2-process NCCL data-parallel step: {dp_skipped}."
elif len(dp_ranks) == 2 and all(isinstance(r.get("train"), (int, float)) for r in dp_ranks):
    total = sum(r["train"] for r in dp_ranks)
    agree = len({r.get("weights_checksum") for r in dp_ranks}) == 1
    backends = "/".join(sorted({str(r.get("tensor_backend")) for r in dp_ranks}))
    scaling = f"{total / single:.2f}x the single process's {single:.1f}" if isinstance(single, (int, float)) and single else "no single-process run to compare"
    dp_md = (f"2-process NCCL data-parallel step (base224, batch 256 per rank, tensors moved by {backends}): {total:.1f} img/s over both ranks, "
             f"{scaling}; final weights {'agree' if agree else 'DIFFER'} across the ranks ({', '.join(str(r.get('weights_checksum')) for r in dp_ranks)}).")
else:
    dp_md = f"2-process NCCL data-parallel step: FAILED ({len(dp_ranks)} of 2 ranks reported; see logs/dp-base224.log)."
raw["data_parallel"] = {"ranks": dp_ranks, "skipped": dp_skipped, "single_process_train": single}

try:
    import torch
    gpu_name = f"{torch.cuda.get_device_name(0)}, PyTorch {torch.__version__} (CUDA {torch.version.cuda})"
except Exception as e:  # noqa: BLE001
    gpu_name = f"PyTorch unavailable ({e})"
try:
    import subprocess
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except Exception:  # noqa: BLE001
    driver = "?"
build = open(".gpu/BUILD_INFO").read().strip().replace("\n", "; ") if os.path.exists(".gpu/BUILD_INFO") else "build info missing"
first = next((raw["workloads"][w]["vit-mae"].get("steps") for w in raw["workloads"]), None)
md = f"""## GPU benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC

{gpu_name}, driver {driver}. vit-mae: {build}.
CUDA parity (f32 and bf16 against the fixtures): **{os.environ['PARITY']}**.
Single-GEMM peak, 8192^3 bf16 (best of 10x5, synchronised): {num(ours_gemm.get('tflops'))} TFLOP/s through candle, {num(torch_gemm.get('tflops'))} TFLOP/s through PyTorch.

MAE pre-training steps (forward, backward, AdamW) on random 224x224 images, mask ratio 0.75, bf16 mixed precision
(vit-mae `--precision bf16`; PyTorch eager: `torch.autocast` bf16, `F.scaled_dot_product_attention`, `torch.optim.AdamW` foreach),
images/s of the median of {first if first is not None else '?'} synchronised steps after 2 warm-up steps.
MFU: the model's matmul FLOPs (training = 3x the masked forward pass) per second over 989 TFLOP/s (H200 dense bf16),
and over the best measured GEMM peak above ({num(gemm_peak)} TFLOP/s).
Peak GPU memory: NVML device memory used above what it was before the process started (bench/memwatch.py), CUDA context included.

| workload | vit-mae img/s | PyTorch img/s | ratio | MFU of 989 (vit-mae / PyTorch) | of GEMM peak (vit-mae / PyTorch) | peak GPU MB (vit-mae / PyTorch) | memory ratio |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n\nTargets (issue 6):\n" + "\n".join(verdicts) + "\n\n" + dp_md + "\n"
print(md)
with open(os.path.join(out, "gpu-results.md"), "w") as f:
    f.write(md)
with open(os.path.join(out, "gpu-results.json"), "w") as f:
    json.dump(raw, f, indent=1)
EOF
say "done"
