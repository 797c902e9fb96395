// `npm run bench`: vit-mae (release build) and the PyTorch eager reference on the same
// workloads, side by side in one command with the same thread count, then a table of
// images/s, achieved GFLOP/s, peak RSS and the ratios, appended to bench/RESULTS.md.
// Both sides' single-GEMM peaks are measured too: "ceiling" is the best ratio any
// implementation could reach on a workload, were all of its time spent in GEMMs as
// fast as the faster of the two BLAS (matmul FLOPs / that peak, against PyTorch).
//
// PyTorch is used when `python3 -c "import torch"` works, or from the interpreter in
// VIT_MAE_PYTHON. BENCH_WORKLOADS (default "fmnist,tiny,base"), BENCH_STEPS and BENCH_THREADS
// (default: every core) override the runs.
import { execFileSync, spawnSync } from 'node:child_process';
import { appendFileSync, existsSync, readFileSync } from 'node:fs';
import { availableParallelism, cpus } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const binary = join(root, 'target', 'release', 'examples', 'bench');
const threads = Number(process.env.BENCH_THREADS ?? availableParallelism());
if (!Number.isInteger(threads) || threads < 1) throw new Error(`BENCH_THREADS must be a positive integer, got ${process.env.BENCH_THREADS}`);
const workloads = (process.env.BENCH_WORKLOADS ?? 'fmnist,tiny,base').split(',');
const steps = { tiny: 9, base: 3, fmnist: 9 };
const python = process.env.VIT_MAE_PYTHON ?? 'python3';

function runJson(command, args) {
  const result = spawnSync(command, args, { cwd: root, encoding: 'utf8', env: { ...process.env, RAYON_NUM_THREADS: String(threads) } });
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')} failed:\n${result.stderr}`);
  return JSON.parse(result.stdout.trim().split('\n').pop());
}

const hasTorch = spawnSync(python, ['-c', 'import torch'], { encoding: 'utf8' }).status === 0;
const gemmRates = runJson(binary, ['gemm']);
const torchRates = hasTorch ? runJson(python, [join('bench', 'reference.py'), 'gemm', '0', String(threads)]) : null;
const [gemm, torchGemm] = [gemmRates.gflops, torchRates?.gflops ?? null];
const peak = Math.max(gemm, torchGemm ?? 0);
const rows = [];
/** Achieved GFLOP/s and its share of the faster single-GEMM peak. */
const gflopsOfPeak = (gflops) => `${gflops.toFixed(1)} (${((100 * gflops) / peak).toFixed(0)}%)`;
for (const workload of workloads) {
  const n = String(process.env.BENCH_STEPS ?? steps[workload] ?? 3);
  process.stderr.write(`${workload}: vit-mae...\n`);
  const ours = runJson(binary, [workload, n]);
  let ref = null;
  if (hasTorch) {
    process.stderr.write(`${workload}: PyTorch...\n`);
    ref = runJson(python, [join('bench', 'reference.py'), workload, n, String(threads)]);
  }
  for (const mode of ['train', 'embed', 'reconstruct']) {
    const gflopPerImage = ours[`${mode}_gflop_per_image`];
    rows.push({
      workload: `${workload} (batch ${ours.batch})`,
      mode,
      ours: ours[mode].toFixed(1),
      torch: ref ? ref[mode].toFixed(1) : 'n/a',
      ratio: ref ? `${(ours[mode] / ref[mode]).toFixed(2)}x` : 'n/a',
      ceiling: ref ? `${(peak / (ref[mode] * gflopPerImage)).toFixed(2)}x` : 'n/a',
      gflops: `${gflopsOfPeak(ours[mode] * gflopPerImage)} / ${ref ? gflopsOfPeak(ref[mode] * gflopPerImage) : 'n/a'}`,
      rss: mode === 'train' ? `${ours.peak_rss_mb.toFixed(0)} / ${ref ? ref.peak_rss_mb.toFixed(0) : 'n/a'}` : '',
    });
  }
  if (ref) rows.torchVersion = ref.torch;
}

const commit = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: root, encoding: 'utf8' }).trim();
const dirty = execFileSync('git', ['status', '--porcelain', '--untracked-files=no'], { cwd: root, encoding: 'utf8' }).trim() ? ' (uncommitted changes)' : '';
// OpenBLAS's kernels as it chose them for this CPU, or as OPENBLAS_CORETYPE forced them.
const openblasCore = gemmRates.openblas_core ? `, OpenBLAS kernels ${gemmRates.openblas_core}${process.env.OPENBLAS_CORETYPE ? ` (OPENBLAS_CORETYPE=${process.env.OPENBLAS_CORETYPE})` : ''}` : '';
const machine = `${cpus()[0]?.model ?? 'unknown CPU'}, ${threads} threads${openblasCore}`;
const header = '| workload | mode | vit-mae img/s | PyTorch img/s | ratio | ceiling | GFLOP/s, % of GEMM peak (vit-mae / PyTorch) | peak RSS MB (vit-mae / PyTorch) |\n|---|---|---|---|---|---|---|---|';
const table = [header, ...rows.map((r) => `| ${r.workload} | ${r.mode} | ${r.ours} | ${r.torch} | ${r.ratio} | ${r.ceiling} | ${r.gflops} | ${r.rss} |`)].join('\n');
// GFLOP/s of every GEMM library over a linear layer's three training products, at 1024^3
// and on each workload's own layers, beside PyTorch's; the engine's choice is marked.
const shapes = ['1024', ...workloads];
const gemmHeader = `| GEMM library | ${shapes.map((s) => (s === '1024' ? '1024^3' : `${s} layers`)).join(' | ')} |\n|---|${shapes.map(() => '---|').join('')}`;
const gemmRow = (name, rates) => `| ${name} | ${shapes.map((s) => (rates[s] ? `${rates[s].toFixed(1)}${torchRates ? ` (${(rates[s] / torchRates.rates[s]).toFixed(2)}x)` : ''}` : 'n/a')).join(' | ')} |`;
const gemmTable = [
  gemmHeader,
  ...Object.entries(gemmRates.libraries).map(([name, rates]) => gemmRow(name === gemmRates.library ? `${name} (chosen)` : name, rates)),
  ...(torchRates ? [`| PyTorch | ${shapes.map((s) => torchRates.rates[s].toFixed(1)).join(' | ')} |`] : []),
].join('\n');
const section = `\n## ${new Date().toISOString().slice(0, 16).replace('T', ' ')} UTC, commit ${commit}${dirty}\n\n${machine}; ` +
  `single-GEMM peak (1024^3 linear-layer products): ${gemm.toFixed(1)} GFLOP/s (vit-mae, ${gemmRates.library}), ${torchGemm ? torchGemm.toFixed(1) : 'n/a'} GFLOP/s (PyTorch's BLAS); ` +
  `PyTorch: ${hasTorch ? rows.torchVersion : 'not installed'}. Images/s are of the median step. ` +
  `Ceiling: the highest ratio to PyTorch possible were the whole step GEMMs at the faster peak.\n\n${table}\n\n` +
  `GEMM GFLOP/s (a linear layer's forward, input-gradient and weight-gradient products; ratio to PyTorch):\n\n${gemmTable}\n`;
process.stdout.write(section);
const results = join(root, 'bench', 'RESULTS.md');
if (!existsSync(results) || !readFileSync(results, 'utf8').trim()) {
  appendFileSync(results, '# Benchmark results\n\nAppended by `npm run bench`: vit-mae beside PyTorch eager on the same machine, same threads, same workloads (see bench/reference.py). GFLOP/s counts the model\'s matmul FLOPs (training = 3x the forward pass).\n');
}
appendFileSync(results, section);
