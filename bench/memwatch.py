"""Peak GPU memory of a command, measured from outside it, the same way for any
implementation (vit-mae's candle/cuBLAS, PyTorch's caching allocator), so that the
two are compared fairly:

    python bench/memwatch.py [--gpu N] [--interval-ms MS] -- <command> [args...]

The command runs with this process's stdin, stdout and stderr (its output passes
straight through). Meanwhile a thread samples the device's used memory with NVML
(pynvml, from the nvidia-ml-py package) every `--interval-ms` (default 1 ms). When it
exits, one JSON line is printed last:

    {"peak_gpu_mem_mb": <peak used - used before the command started>, ...}

so it covers the CUDA context, the libraries' workspaces and whatever an allocator
holds but does not use, as a user of the GPU would see it (nvidia-smi). It counts
every process on that GPU, so nothing else should be running there. Without pynvml,
`nvidia-smi --query-gpu=memory.used` is polled instead (every ~50 ms, so a short
spike can be missed); without either the peak is null. The exit status is the
command's. `--gpu` defaults to the first entry of CUDA_VISIBLE_DEVICES, else 0.
"""
import json
import os
import shutil
import subprocess
import sys
import threading
import time


def nvml_reader(index):
    """A function returning the used MiB of GPU `index` through NVML, or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetMemoryInfo(handle)
        return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
    except Exception as e:  # noqa: BLE001 - pynvml missing, no driver, no GPU
        print(f"memwatch: NVML unavailable ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def smi_reader(index):
    """A function returning the used MiB of GPU `index` from nvidia-smi, or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        print("memwatch: nvidia-smi not found either: no memory measurement", file=sys.stderr)
        return None

    def read():
        out = subprocess.run([smi, f"--id={index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0])

    try:
        read()
        return read
    except Exception as e:  # noqa: BLE001
        print(f"memwatch: nvidia-smi failed ({type(e).__name__}: {e}): no memory measurement", file=sys.stderr)
        return None


def main():
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit("usage: memwatch.py [--gpu N] [--interval-ms MS] -- <command> [args...]")
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1:]
    if not command:
        sys.exit("memwatch.py: no command after --")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    gpu, interval = int(visible) if visible.isdigit() else 0, 1.0
    for i in range(0, len(options) - 1, 2):
        if options[i] == "--gpu":
            gpu = int(options[i + 1])
        elif options[i] == "--interval-ms":
            interval = float(options[i + 1])
    read, method = nvml_reader(gpu), "nvml"
    if read is None:
        read, method, interval = smi_reader(gpu), "nvidia-smi", max(interval, 50.0)
    if read is None:
        method = None

    before = read() if read else None
    state = {"peak": before, "samples": 0, "errors": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                used = read()
                state["samples"] += 1
                if used > state["peak"]:
                    state["peak"] = used
            except Exception:  # noqa: BLE001 - a failed sample is skipped
                state["errors"] += 1
            done.wait(interval / 1000)

    watcher = threading.Thread(target=sample, daemon=True) if read else None
    if watcher:
        watcher.start()
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(command)
    except OSError as e:
        done.set()
        print(f"memwatch: cannot run {command[0]}: {e}", file=sys.stderr)
        print(json.dumps({"peak_gpu_mem_mb": None, "exit_code": 127}))
        sys.exit(127)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = proc.wait()
    seconds = time.perf_counter() - start
    done.set()
    if watcher:
        watcher.join(timeout=5)
    sys.stdout.flush()
    peak = state["peak"] - before if read and state["peak"] is not None else None
    print(json.dumps({
        "peak_gpu_mem_mb": peak,
        "gpu_mem_before_mb": before,
        "method": method,
        "gpu": gpu,
        "samples": state["samples"],
        "interval_ms": interval,
        "seconds": seconds,
        "exit_code": code,
    }), flush=True)
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
