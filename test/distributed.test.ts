// Data-parallel runs through the facade and the CLI: 2 ranks under Open MPI's mpirun (one
// thread each, loopback) against one process. The numerics of data parallelism (loss
// curves, weights, fine-tuning with mixup, faults) are the core's tests
// (native/core/tests/suite/data_parallel.rs); these check what the JS side adds: the
// options, the started event, rank 0 alone printing and writing, and the CLI's flags.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MaskedAutoencoder, VitClassifier, type MaeConfig } from '../ts/index.js';
import { encodeIdxImages, encodeIdxLabels, readSafetensors } from './helpers.js';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'dist', 'cli.js');
const dir = mkdtempSync(join(tmpdir(), 'vit-mae-distributed-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const TINY = { imgSize: 16, embedDim: 16, depth: 1, numHeads: 2, decoderEmbedDim: 8, decoderDepth: 1, decoderNumHeads: 2 };
const LABELS = Array.from({ length: 40 }, (_, i) => i % 3);
const images = join(dir, 'images-idx3-ubyte');
const labels = join(dir, 'labels-idx1-ubyte');

beforeAll(() => {
  writeFileSync(images, encodeIdxImages(LABELS.length, 16, 16, (i, x, y) => (LABELS[i] * 70 + x * 7 + y * 3 + i * 5) % 256));
  writeFileSync(labels, encodeIdxLabels(LABELS));
});

/** `args` as one process, or as `ranks` ranks under mpirun (fails naming Open MPI when it is missing). */
function launch(ranks: number, args: string[], env: Record<string, string> = {}) {
  const command = ranks === 1 ? [process.execPath, ...args] : mpirun(ranks, [process.execPath, ...args]);
  const result = spawnSync(command[0], command.slice(1), { encoding: 'utf8', cwd: root, env: { ...process.env, ...env }, timeout: 120_000 });
  if (result.error) throw result.error;
  return result;
}

function mpirun(ranks: number, command: string[]): string[] {
  const version = spawnSync('mpirun', ['--version'], { encoding: 'utf8' });
  if (version.error) throw new Error(`mpirun could not be run (${version.error.message}): these tests need Open MPI (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev)`);
  // Root in CI containers; more ranks than cores on small machines.
  const root = process.getuid?.() === 0 ? ['--allow-run-as-root'] : [];
  return ['mpirun', ...root, '--oversubscribe', '-n', String(ranks), ...command];
}

function jsonLines(stdout: string): Record<string, any>[] {
  return stdout.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l));
}

describe('distributed options', () => {
  const data = { kind: 'idx', path: images, labelsPath: labels } as const;

  it('a run alone reports rank 0 of 1 first; the options are checked before any work', async () => {
    const mae = MaskedAutoencoder.create({ preset: 'mae_vit_fmnist_patch4_32', config: TINY as Partial<MaeConfig>, seed: 1 });
    const run = mae.pretrain({ data, batchSize: 8, maxSteps: 1, workers: 1, distributed: 'none', distributedTimeout: 5 });
    const events = [];
    for await (const e of run) events.push(e);
    expect(events[0]).toEqual({ type: 'started', rank: 0, worldSize: 1, localRank: 0, backend: 'none' });
    expect(events.filter((e) => e.type === 'started')).toHaveLength(1);

    const bad = (message: RegExp) => expect.objectContaining({ code: 'E_ARGUMENT', message: expect.stringMatching(message) });
    expect(() => mae.pretrain({ data, distributed: 'nccl' as 'mpi' })).toThrow(bad(/distributed must be one of auto, mpi, none, got nccl/));
    for (const distributedTimeout of [0, -1, Number.NaN, Infinity]) {
      expect(() => mae.pretrain({ data, distributedTimeout })).toThrow(bad(/distributedTimeout must be a number of seconds above 0/));
    }
    await expect(mae.embedDataset(data, { distributed: 'all' as 'mpi' })).rejects.toEqual(bad(/distributed must be/));
    const clf = await VitClassifier.fromPretrained(mae, { numClasses: 3 });
    await expect(clf.evaluate(data, { distributedTimeout: 0 })).rejects.toEqual(bad(/distributedTimeout/));
    expect(() => clf.finetune({ data, distributed: '' as 'mpi' })).toThrow(bad(/distributed must be/));
    const started: unknown[] = [];
    await clf.evaluate(data, { workers: 1, onStarted: (e) => started.push(e) });
    expect(started).toEqual([{ type: 'started', rank: 0, worldSize: 1, localRank: 0, backend: 'none' }]);
  });

  it("'mpi' without an MPI library fails with E_DISTRIBUTED naming the packages", () => {
    const script = `import('${join(root, 'dist', 'index.js')}').then(async ({ MaskedAutoencoder }) => {
      const mae = MaskedAutoencoder.create({ preset: 'mae_vit_fmnist_patch4_32', config: ${JSON.stringify(TINY)} });
      await mae.pretrain({ data: { kind: 'idx', path: '${images}' }, batchSize: 8, maxSteps: 1, distributed: 'mpi' }).result
        .then(() => console.log('trained'), (e) => console.log(JSON.stringify({ code: e.code, message: e.message })));
    });`;
    const result = launch(1, ['-e', script], { VIT_MAE_MPI_LIBRARY: join(dir, 'no-libmpi.so') });
    expect(result.status, result.stderr).toBe(0);
    const error = JSON.parse(result.stdout);
    expect(error.code).toBe('E_DISTRIBUTED');
    expect(error.message).toContain('no-libmpi.so');
    expect(error.message).toMatch(/libopenmpi-dev/);
  });
});

describe('the CLI on 2 ranks under mpirun', () => {
  const classifier = join(dir, 'tiny-classifier.safetensors');
  beforeAll(async () => {
    const mae = MaskedAutoencoder.create({ preset: 'mae_vit_fmnist_patch4_32', config: TINY as Partial<MaeConfig>, seed: 0 });
    await (await VitClassifier.fromPretrained(mae, { numClasses: 3 })).save(classifier);
  });

  const pretrain = (out: string, batchSize: number) => [
    cli, 'pretrain', '--data', images, '--preset', 'mae_vit_fmnist_patch4_32', '--config', JSON.stringify(TINY), '--out', out,
    '--epochs', '1', '--warmup-epochs', '0', '--batch-size', String(batchSize), '--lr', '0.002', '--workers', '1', '--seed', '3', '--json',
  ];

  it('pretrain: rank 0 alone prints and writes; 2 x 8 follows 1 x 16 step by step', () => {
    const two = launch(2, pretrain(join(dir, 'two'), 8));
    expect(two.status, two.stderr).toBe(0);
    const events = jsonLines(two.stdout);
    expect(events[0]).toEqual({ type: 'started', rank: 0, worldSize: 2, localRank: 0, backend: 'mpi' });
    expect(events.filter((e) => e.type === 'started' || e.type === 'summary')).toHaveLength(2);
    const summary = events.at(-1)!;
    // 40 images, 20 per rank: 2 steps of 2 x 8 (drop_last), 16 images a step.
    expect(summary).toMatchObject({ type: 'summary', steps: 2, imagesSeen: 32, aborted: false });
    expect(existsSync(join(dir, 'two', 'model.safetensors'))).toBe(true);
    expect(existsSync(join(dir, 'two', 'reconstruction.png'))).toBe(true);

    const one = launch(1, pretrain(join(dir, 'one'), 16));
    expect(one.status, one.stderr).toBe(0);
    const oneEvents = jsonLines(one.stdout);
    expect(oneEvents[0]).toMatchObject({ type: 'started', worldSize: 1 });
    const losses = (list: Record<string, any>[]) => list.filter((e) => e.type === 'step').map((e) => e.loss as number);
    const [a, b] = [losses(events), losses(oneEvents)];
    expect(a).toHaveLength(2);
    expect(b).toHaveLength(2);
    // The loss curves agree within 1e-5 relative (the sums differ only in f32 rounding).
    a.forEach((loss, i) => expect(Math.abs(loss - b[i]) / Math.abs(b[i])).toBeLessThan(1e-5));
  });

  it('eval and embed on 2 ranks print and write what one process does: the same top-1, the same embeddings', () => {
    const out = (name: string) => join(dir, name);
    const ranks = [1, 2].map((n) => {
      const e = launch(n, [cli, 'eval', classifier, '--data', images, '--labels', labels, '--workers', '1', '--batch-size', '8', '--json']);
      expect(e.status, e.stderr).toBe(0);
      const embed = launch(n, [cli, 'embed', classifier, '--data', images, '--labels', labels, '--out', out(`embeddings-${n}.safetensors`), '--workers', '1', '--batch-size', '8', '--json']);
      expect(embed.status, embed.stderr).toBe(0);
      return { evaluations: jsonLines(e.stdout), embeddings: jsonLines(embed.stdout) };
    });
    for (const { evaluations, embeddings } of ranks) {
      expect(evaluations).toHaveLength(1);
      expect(evaluations[0]).toMatchObject({ type: 'evaluation', count: LABELS.length });
      expect(embeddings).toEqual([{ type: 'embeddings', path: expect.any(String), count: LABELS.length, dim: 16, labelled: true }]);
    }
    // Top-1 and top-5 are counts, summed over the shards: exact. The mean loss is a sum in
    // another order.
    const [alone, shared] = ranks.map((r) => r.evaluations[0]);
    expect({ ...shared, loss: 0 }).toEqual({ ...alone, loss: 0 });
    expect(Math.abs(shared.loss - alone.loss) / alone.loss).toBeLessThan(1e-6);
    const [single, sharded] = [1, 2].map((n) => readSafetensors(out(`embeddings-${n}.safetensors`)));
    expect(sharded.ints).toEqual(single.ints);
    const [x, y] = [single.tensors.embeddings.data, sharded.tensors.embeddings.data];
    expect(y.length).toBe(x.length);
    // The same images through the same weights, in batches of another make-up.
    expect(Math.max(...x.map((v, i) => Math.abs(v - y[i])))).toBeLessThan(1e-5);
  });
});
