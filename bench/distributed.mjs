// `npm run bench:distributed`: data-parallel scaling on this machine's CPU, one process
// with every core against one rank per core under mpirun (one thread each), the same
// global batch, for vit-mae (the CLI's pretrain on the shipped Fashion-MNIST images) and,
// side by side when PyTorch is importable, for PyTorch's DistributedDataParallel on gloo
// (bench/reference.py on random images: no decoding or augmentation, which favours it).
// Prints a table of images/s and appends it to bench/RESULTS.md.
//
// BENCH_STEPS (default 12 timed steps, after 2 of warm-up) and VIT_MAE_PYTHON (default
// python3) override the runs. Needs Open MPI's mpirun.
import { spawnSync } from 'node:child_process';
import { appendFileSync, mkdtempSync, rmSync } from 'node:fs';
import { availableParallelism, cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cores = availableParallelism();
const warmup = 2;
const steps = Number(process.env.BENCH_STEPS ?? 12);
const python = process.env.VIT_MAE_PYTHON ?? 'python3';
// bench/reference.py's fmnist workload: mae_vit_fmnist_patch4_32 at a global batch of 256.
const globalBatch = 256;
const out = mkdtempSync(join(tmpdir(), 'vit-mae-bench-distributed-'));

/** `command` as one process, or as `ranks` ranks under mpirun, with `threads` compute threads each. */
function launch(ranks, threads, command, env = {}) {
  const mpi = ranks === 1 ? [] : ['mpirun', ...(process.getuid?.() === 0 ? ['--allow-run-as-root'] : []), '--oversubscribe', '--bind-to', 'none', '-n', String(ranks)];
  const [program, ...args] = [...mpi, ...command];
  const threadsEnv = { RAYON_NUM_THREADS: String(threads), OMP_NUM_THREADS: String(threads), MKL_NUM_THREADS: String(threads) };
  const result = spawnSync(program, args, { cwd: root, encoding: 'utf8', env: { ...process.env, ...threadsEnv, ...env } });
  if (result.error || result.status !== 0) throw new Error(`${[program, ...args].join(' ')} failed: ${result.error?.message ?? result.stderr}`);
  return result.stdout;
}

/** vit-mae's images/s of the median step after the warm-up (as bench/reference.py times), from its step events' cumulative rates. */
function vitMae(ranks, threads) {
  const stdout = launch(ranks, threads, [
    process.execPath, 'dist/cli.js', 'pretrain', '--data', 'data/fashion-mnist/train-images-idx3-ubyte.gz', '--preset', 'mae_vit_fmnist_patch4_32',
    '--pad-to', '32', '--epochs', '1', '--warmup-epochs', '0', '--batch-size', String(globalBatch / ranks), '--max-steps', String(warmup + steps),
    '--workers', '1', '--out', join(out, `vit-mae-${ranks}`), '--json',
  ]);
  const events = stdout.trim().split('\n').map((line) => JSON.parse(line)).filter((e) => e.type === 'step');
  // A step's cumulative rate gives the time since the run started: step * batch / rate.
  const seconds = (e) => (e.step * globalBatch) / e.imagesPerSec;
  const times = events.slice(warmup).map((e, i) => seconds(e) - seconds(events[warmup + i - 1])).sort((a, b) => a - b);
  return globalBatch / times[Math.floor(times.length / 2)];
}

/** PyTorch's images/s (`train`; DDP on gloo when `ranks` > 1) and version (`torch`), as rank 0 of bench/reference.py reports them. */
function pytorch(ranks, threads) {
  const stdout = launch(ranks, threads, [python, 'bench/reference.py', 'fmnist', String(steps), String(threads), 'train'], { VIT_MAE_BENCH_BATCH: String(globalBatch / ranks) });
  return JSON.parse(stdout.trim().split('\n').pop());
}

const hasTorch = spawnSync(python, ['-c', 'import torch'], { encoding: 'utf8' }).status === 0;
const layouts = [[1, cores], [cores, 1]];
const rows = layouts.map(([ranks, threads]) => {
  const torch = hasTorch ? pytorch(ranks, threads) : null;
  return { ranks, threads, vitMae: vitMae(ranks, threads), torch: torch?.train ?? null, torchVersion: torch?.torch };
});
rmSync(out, { recursive: true, force: true });

const cpu = cpus()[0]?.model ?? 'unknown CPU';
const fmt = (x) => (x === null ? 'n/a' : x.toFixed(0));
const table = [
  `### Data-parallel scaling, ${new Date().toISOString().slice(0, 10)}: ${cpu}, ${cores} cores`,
  '',
  `mae_vit_fmnist_patch4_32, global batch ${globalBatch}, the median of ${steps} steps after ${warmup} of warm-up (PyTorch: 1). vit-mae: \`vit-mae pretrain\` on the shipped Fashion-MNIST images; PyTorch${hasTorch ? ` ${rows[0].torchVersion}` : ' (not installed)'}: bench/reference.py, DistributedDataParallel on gloo, random images.`,
  '',
  '| layout | vit-mae images/s | PyTorch images/s | vit-mae / PyTorch |',
  '|---|---|---|---|',
  ...rows.map((r) => `| ${r.ranks} rank${r.ranks > 1 ? 's' : ''} x ${r.threads} thread${r.threads > 1 ? 's' : ''} | ${fmt(r.vitMae)} | ${fmt(r.torch)} | ${r.torch ? (r.vitMae / r.torch).toFixed(2) : 'n/a'} |`),
  '',
];
process.stdout.write(`${table.join('\n')}\n`);
appendFileSync(join(root, 'bench', 'RESULTS.md'), `\n${table.join('\n')}`);
