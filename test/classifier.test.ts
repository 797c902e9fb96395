// The VitClassifier facade: parity with the PyTorch reference (../shared/fixtures),
// building on a pre-trained MAE, prediction, embeddings, evaluation, the fine-tuning
// protocols, errors and save/load. Models here are tiny so the file runs in seconds.
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  IMAGENET_MEAN,
  IMAGENET_STD,
  MaskedAutoencoder,
  VitClassifier,
  VitMaeError,
  type Tensor,
  type TrainingEvent,
} from '../ts/index.js';
import { FIXTURE_DIRS, FIXTURES, TINY, fixture, randomTensor, readSafetensors, worstMismatch } from './helpers.js';

const dir = mkdtempSync(join(tmpdir(), 'vit-mae-classifier-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const D = TINY.embedDim;

/** `n` smooth images `[n, 3, 16, 16]` with values in [0, 1]. */
function rawImages(n: number, seed = 3): Tensor {
  const t = randomTensor([n, 3, 16, 16], seed);
  t.data.forEach((v, i) => (t.data[i] = Math.min(1, Math.max(0, 0.5 + 0.3 * v + 0.2 * Math.sin((i % 16) / 3 + Math.floor(i / 768))))));
  return t;
}

/** Per-channel `(x - mean) / std`, as the loader normalises. */
function normalise(images: Tensor, mean = IMAGENET_MEAN, std = IMAGENET_STD): Tensor {
  const [, c, h, w] = images.shape;
  const data = images.data.map((v, i) => {
    const ch = Math.floor(i / (h * w)) % c;
    return (v - mean[ch]) / std[ch];
  });
  return { data, shape: [...images.shape] };
}

function rows(t: Tensor): Float32Array[] {
  const [n, k] = t.shape;
  return Array.from({ length: n }, (_, i) => t.data.subarray(i * k, (i + 1) * k));
}

function argmax(row: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

/** The VitMaeError a call throws synchronously, or its promise (or `.result`) rejects with. */
async function failure(fn: () => unknown): Promise<VitMaeError> {
  try {
    const value = fn() as { result?: Promise<unknown> } | Promise<unknown> | undefined;
    await (value && 'result' in value ? value.result : value);
  } catch (error) {
    expect(error).toBeInstanceOf(VitMaeError);
    return error as VitMaeError;
  }
  throw new Error('expected a VitMaeError, but the call succeeded');
}

const N = 8;
const LABELS = [0, 1, 2, 0, 1, 2, 0, 1];
const RAW = rawImages(N);
const LABELLED = { kind: 'memory', images: RAW, labels: LABELS } as const;
const UNLABELLED = { kind: 'memory', images: RAW } as const;
/** Fast, deterministic training options for the tiny models. */
const FAST = { augment: { randomResizedCrop: false, hflip: false }, batchSize: 4, workers: 1, epochs: 2, warmupEpochs: 0, lr: 1e-2 };

const tinyMae = (seed = 1) => MaskedAutoencoder.create({ config: TINY, seed });

// Every classifier case of every fixture folder: global pooling (vit-cls-tiny), cls
// pooling with one channel and patch 7 (vit-cls-token), the linear probe's BatchNorm head
// (vit-linprobe).
const CLASSIFIER_CASES = FIXTURE_DIRS.flatMap((dir) =>
  ['vit-cls-tiny', 'vit-cls-token', 'vit-linprobe'].filter((name) => existsSync(fixture(`${name}.case.safetensors`, dir))).map((name) => ({ name, dir })),
);

it('the repository has every classifier case', () => expect(CLASSIFIER_CASES.filter((c) => c.dir === FIXTURES)).toHaveLength(3));

describe.each(CLASSIFIER_CASES)('parity with the PyTorch reference ($name in $dir)', ({ name: caseName, dir }) => {
  const reference = readSafetensors(fixture(`${caseName}.case.safetensors`, dir));
  const published = JSON.parse(reference.metadata.config) as Record<string, number | boolean>;
  const smoothing = published.smoothing as number;
  const { imgs, logits, loss } = reference.tensors;
  const labels = reference.ints.labels.data;
  const output = (want: number) => Math.max(1e-4, 1e-4 * Math.abs(want));
  const FORMATS = [
    { name: 'safetensors', load: () => VitClassifier.load(fixture(`${caseName}.weights.safetensors`, dir)) },
    // A .pth holds only the state dict: its shapes do not tell the head count.
    { name: 'pth', load: () => VitClassifier.load(fixture(`${caseName}.pth`, dir), { config: { numHeads: published.num_heads as number } }) },
  ] as const;

  if (caseName === 'vit-cls-tiny') it('the fixture smooths labels by 0.1', () => expect(smoothing).toBe(0.1));

  describe.each(FORMATS)('loaded from $name', (format) => {
    it('forward matches the logits', async () => {
      const clf = await format.load();
      expect(clf.checkpointFormat).toBe(format.name);
      expect(clf.config).toMatchObject({
        imgSize: published.img_size, patchSize: published.patch_size, inChans: published.in_chans, embedDim: published.embed_dim, depth: published.depth,
        numHeads: published.num_heads, numClasses: published.num_classes, globalPool: published.global_pool, headBatchNorm: published.head_batch_norm ?? false,
      });
      const out = await clf.forward(imgs);
      expect(out.shape).toEqual(logits.shape);
      expect(worstMismatch(out.data, logits.data, output)).toBeNull();
    });

    it('lossAndGradients matches the smoothed loss and every gradient', async () => {
      const clf = await format.load();
      const got = await clf.lossAndGradients(imgs, labels, { labelSmoothing: smoothing });
      expect(Math.abs(got.loss - loss.data[0])).toBeLessThanOrEqual(output(loss.data[0]));

      const expected = Object.keys(reference.tensors).filter((k) => k.startsWith('grad.')).map((k) => k.slice(5));
      expect(Object.keys(got.gradients).sort()).toEqual([...expected].sort());
      expect(Object.keys(clf.parameterShapes()).sort()).toEqual([...expected].sort());
      for (const name of expected) {
        const want = reference.tensors[`grad.${name}`];
        const scale = want.data.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
        expect(scale, `${name}: reference gradient is zero`).toBeGreaterThan(0);
        expect(got.gradients[name].shape, name).toEqual(want.shape);
        expect(worstMismatch(got.gradients[name].data, want.data, () => 1e-3 * scale), name).toBeNull();
      }
    });
  });

  it('predict: top1 is the argmax, top5 holds the top classes (5, or all if fewer) by falling probability, probabilities are the softmax', async () => {
    const clf = await FORMATS[0].load();
    const [out, pred] = await Promise.all([clf.forward(imgs), clf.predict(imgs)]);
    const n = imgs.shape[0];
    const k = published.num_classes as number;
    const top = Math.min(5, k);
    expect(pred.probabilities.shape).toEqual([n, k]);
    expect(pred.top1).toBeInstanceOf(Int32Array);
    expect(pred.top1).toHaveLength(n);
    expect(pred.top5).toHaveLength(n);
    const probs = rows(pred.probabilities);
    rows(out).forEach((logitRow, i) => {
      expect(pred.top1[i]).toBe(argmax(logitRow));
      const best = Array.from(pred.top5[i]);
      expect(best).toHaveLength(top);
      expect(new Set(best).size).toBe(top);
      expect(best[0]).toBe(pred.top1[i]);
      for (let j = 1; j < top; j++) expect(probs[i][best[j - 1]]).toBeGreaterThanOrEqual(probs[i][best[j]]);
      // Nothing outside the top classes beats the last of them.
      const rest = [...Array(k).keys()].filter((c) => !best.includes(c));
      for (const c of rest) expect(probs[i][c]).toBeLessThanOrEqual(probs[i][best[top - 1]]);
      expect(probs[i].reduce((a, b) => a + b, 0)).toBeCloseTo(1, 5);
      const max = Math.max(...logitRow);
      const z = logitRow.reduce((a, v) => a + Math.exp(v - max), 0);
      logitRow.forEach((v, c) => expect(probs[i][c]).toBeCloseTo(Math.exp(v - max) / z, 5));
    });
  });
});

describe('VitClassifier.fromPretrained', () => {
  it('builds a global-pool classifier on an MAE, with fc_norm and head and no norm', async () => {
    const mae = tinyMae();
    const clf = await VitClassifier.fromPretrained(mae, { numClasses: 3 });
    expect(clf.config).toEqual({ imgSize: 16, patchSize: 4, inChans: 3, embedDim: D, depth: 2, numHeads: 2, mlpRatio: 4, layerNormEps: 1e-6, numClasses: 3, globalPool: true, headBatchNorm: false });
    expect(clf.checkpointFormat).toBeNull();
    expect(clf.device).toBe('cpu');
    expect(clf.precision).toBe('f32');
    const shapes = clf.parameterShapes();
    expect(shapes['fc_norm.weight']).toEqual([D]);
    expect(shapes['fc_norm.bias']).toEqual([D]);
    expect(shapes['head.weight']).toEqual([3, D]);
    expect(shapes['head.bias']).toEqual([3]);
    expect(shapes['pos_embed']).toEqual([1, 17, D]);
    expect(Object.keys(shapes).filter((k) => k.startsWith('norm.'))).toEqual([]);
    expect(Object.keys(shapes).filter((k) => k.startsWith('decoder') || k === 'mask_token')).toEqual([]);
    expect(clf.parameterCount).toBe(Object.values(shapes).reduce((a, s) => a + s.reduce((x, y) => x * y, 1), 0));
    const logits = await clf.forward(normalise(RAW));
    expect(logits.shape).toEqual([N, 3]);
    expect(logits.data.every(Number.isFinite)).toBe(true);
  });

  it('with globalPool false keeps the final norm, and its features are the MAE cls embedding', async () => {
    const mae = tinyMae();
    const clf = await VitClassifier.fromPretrained(mae, { numClasses: 3, globalPool: false });
    expect(clf.config).toMatchObject({ globalPool: false, headBatchNorm: false, numClasses: 3 });
    const shapes = clf.parameterShapes();
    expect(shapes['norm.weight']).toEqual([D]);
    expect(shapes['norm.bias']).toEqual([D]);
    expect(shapes).not.toHaveProperty('fc_norm.weight');
    const x = normalise(RAW);
    const [features, cls] = await Promise.all([clf.embed(x), mae.embed(x, { pool: 'cls' })]);
    expect(features.shape).toEqual([N, D]);
    expect(worstMismatch(features.data, cls.data, () => 1e-5)).toBeNull();
  });

  it('headBatchNorm gives the linear-probe head (head.1), and imgSize resizes the position embedding', async () => {
    const mae = tinyMae();
    const probe = await VitClassifier.fromPretrained(mae, { numClasses: 3, headBatchNorm: true });
    expect(probe.config.headBatchNorm).toBe(true);
    expect(probe.parameterShapes()).toMatchObject({ 'head.1.weight': [3, D], 'head.1.bias': [3] });
    expect(probe.parameterShapes()).not.toHaveProperty('head.weight');

    const big = await VitClassifier.fromPretrained(mae, { numClasses: 3, imgSize: 32 });
    expect(big.config).toMatchObject({ imgSize: 32, patchSize: 4 });
    expect(big.parameterShapes()['pos_embed']).toEqual([1, 65, D]);
    expect((await big.forward(randomTensor([2, 3, 32, 32]))).shape).toEqual([2, 3]);
    await expect(big.forward(randomTensor([2, 3, 16, 16]))).rejects.toMatchObject({ code: 'E_SHAPE' });
  });

  it('from a saved MAE path gives the same classifier as from the model', async () => {
    const mae = tinyMae(4);
    const path = join(dir, 'mae.safetensors');
    await mae.save(path);
    const [fromModel, fromPath] = await Promise.all([
      VitClassifier.fromPretrained(mae, { numClasses: 3, seed: 2 }),
      VitClassifier.fromPretrained(path, { numClasses: 3, seed: 2 }),
    ]);
    expect(fromPath.config).toEqual(fromModel.config);
    const x = normalise(RAW);
    const [a, b] = await Promise.all([fromModel.forward(x), fromPath.forward(x)]);
    expect(b.data).toEqual(a.data);
    // Another head seed gives another head.
    const other = await VitClassifier.fromPretrained(mae, { numClasses: 3, seed: 3 });
    expect((await other.forward(x)).data).not.toEqual(a.data);
  });
});

describe('embed', () => {
  it('classifier features are [N, embedDim]', async () => {
    const clf = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    const features = await clf.embed(normalise(RAW));
    expect(features.shape).toEqual([N, D]);
    expect(features.data.every(Number.isFinite)).toBe(true);
  });

  it('MaskedAutoencoder.embed pools mean or cls, and rejects other pools', async () => {
    const mae = tinyMae();
    const x = normalise(RAW);
    const [byDefault, mean, cls] = await Promise.all([mae.embed(x), mae.embed(x, { pool: 'mean' }), mae.embed(x, { pool: 'cls' })]);
    expect(mean.shape).toEqual([N, D]);
    expect(cls.shape).toEqual([N, D]);
    expect(byDefault.data).toEqual(mean.data);
    expect(mean.data).not.toEqual(cls.data);
    const error = await failure(() => mae.embed(x, { pool: 'max' as 'mean' }));
    expect(error.code).toBe('E_ARGUMENT');
  });
});

describe('evaluate', () => {
  it('counts every image, agrees with predict, and reports progress', async () => {
    const n = 10; // not a multiple of the batch size: nothing may be dropped
    const raw = rawImages(n, 7);
    const labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0];
    const clf = await VitClassifier.fromPretrained(tinyMae(2), { numClasses: 3, seed: 5 });
    const progress: [number, number][] = [];
    const e = await clf.evaluate({ kind: 'memory', images: raw, labels }, { batchSize: 4, workers: 1, onProgress: (done, total) => progress.push([done, total]) });
    expect(e.count).toBe(n);
    for (const v of [e.top1, e.top5]) {
      expect(v).toBeGreaterThanOrEqual(0);
      expect(v).toBeLessThanOrEqual(1);
    }
    expect(e.top5).toBeGreaterThanOrEqual(e.top1);
    expect(e.top5).toBe(1); // three classes: all are in the top five
    expect(Number.isFinite(e.loss)).toBe(true);

    const { top1 } = await clf.predict(normalise(raw));
    expect(e.top1).toBeCloseTo(top1.filter((c, i) => c === labels[i]).length / n, 10);

    expect(progress.length).toBeGreaterThan(0);
    expect(progress.every(([, total]) => total === n)).toBe(true);
    expect(progress.at(-1)).toEqual([n, n]);
    for (let i = 1; i < progress.length; i++) expect(progress[i][0]).toBeGreaterThan(progress[i - 1][0]);
  });

  it('rejects with E_ABORTED on an aborted signal, and E_ARGUMENT without labels', async () => {
    const clf = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    // batchSize 1: several batches, so the pass cannot finish before it sees the abort (see the test below).
    expect((await failure(() => clf.evaluate(LABELLED, { batchSize: 1, workers: 1, signal: AbortSignal.abort() }))).code).toBe('E_ABORTED');
    expect((await failure(() => clf.evaluate(UNLABELLED, { workers: 1 }))).code).toBe('E_ARGUMENT');
  });

  // The signal is checked before the native job starts, so even a one-batch pass never runs.
  it('an already-aborted signal always rejects a one-batch pass with E_ABORTED', async () => {
    const clf = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    const mae = tinyMae();
    for (let i = 0; i < 10; i++) {
      const options = { workers: 1, signal: AbortSignal.abort() }; // default batchSize 64 > N
      expect((await failure(() => clf.evaluate(LABELLED, options))).code).toBe('E_ABORTED');
      expect((await failure(() => clf.embedDataset(LABELLED, options))).code).toBe('E_ABORTED');
      expect((await failure(() => mae.embedDataset(LABELLED, options))).code).toBe('E_ABORTED');
    }
  });
});

describe('embedDataset', () => {
  it('classifier: features in dataset order with labels, written to safetensors', async () => {
    const clf = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    const output = join(dir, 'clf-embeddings.safetensors');
    const e = await clf.embedDataset(LABELLED, { batchSize: 3, workers: 1, output });
    expect(e.features.shape).toEqual([N, D]);
    expect(e.indices).toEqual(Uint32Array.from({ length: N }, (_, i) => i));
    expect(e.labels).toEqual(Int32Array.from(LABELS));
    // The same features embed gives on the normalised images.
    const direct = await clf.embed(normalise(RAW));
    expect(worstMismatch(e.features.data, direct.data, (w) => Math.max(1e-4, 1e-4 * Math.abs(w)))).toBeNull();

    const file = readSafetensors(output);
    expect(file.tensors.embeddings.shape).toEqual([N, D]);
    expect(file.tensors.embeddings.data).toEqual(e.features.data);
    expect(file.ints.indices.data).toEqual([...Array(N).keys()]);
    expect(file.ints.labels.data).toEqual(LABELS);
  });

  it('classifier: an unlabelled dataset gives null labels; an aborted signal E_ABORTED', async () => {
    const clf = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    const progress: [number, number][] = [];
    const e = await clf.embedDataset(UNLABELLED, { batchSize: 5, workers: 1, onProgress: (d, t) => progress.push([d, t]) });
    expect(e.features.shape).toEqual([N, D]);
    expect(e.labels).toBeNull();
    expect(e.indices).toEqual(Uint32Array.from({ length: N }, (_, i) => i));
    expect(progress.at(-1)).toEqual([N, N]);
    expect((await failure(() => clf.embedDataset(LABELLED, { batchSize: 1, workers: 1, signal: AbortSignal.abort() }))).code).toBe('E_ABORTED');
    expect((await failure(() => tinyMae().embedDataset(LABELLED, { batchSize: 1, workers: 1, signal: AbortSignal.abort() }))).code).toBe('E_ABORTED');
  });

  it('MAE: pooled features (mean or cls) in order, with labels, written to safetensors', async () => {
    const mae = tinyMae();
    const output = join(dir, 'mae-embeddings.safetensors');
    const mean = await mae.embedDataset(LABELLED, { batchSize: 3, workers: 1, output });
    expect(mean.features.shape).toEqual([N, D]);
    expect(mean.indices).toEqual(Uint32Array.from({ length: N }, (_, i) => i));
    expect(mean.labels).toEqual(Int32Array.from(LABELS));
    const direct = await mae.embed(normalise(RAW), { pool: 'mean' });
    expect(worstMismatch(mean.features.data, direct.data, (w) => Math.max(1e-4, 1e-4 * Math.abs(w)))).toBeNull();
    const file = readSafetensors(output);
    expect(file.tensors.embeddings.shape).toEqual([N, D]);
    expect(file.ints.indices.data).toEqual([...Array(N).keys()]);
    expect(file.ints.labels.data).toEqual(LABELS);

    const cls = await mae.embedDataset(UNLABELLED, { batchSize: 8, workers: 1, pool: 'cls' });
    expect(cls.labels).toBeNull();
    expect(cls.features.shape).toEqual([N, D]);
    expect(cls.features.data).not.toEqual(mean.features.data);
  });
});

describe('finetune', () => {
  it("'finetune' with evalData: step, epochEnd and eval events in order, a summary, changed weights", async () => {
    const clf = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    const x = normalise(RAW);
    const before = await clf.forward(x);
    const seen: TrainingEvent[] = [];
    const run = clf.finetune({ ...FAST, data: LABELLED, evalData: LABELLED, onProgress: (e) => seen.push(e) });
    const iterated: TrainingEvent[] = [];
    for await (const e of run) iterated.push(e);
    const summary = await run.result;
    expect(iterated).toEqual(seen);
    expect(iterated.map((e) => `${e.type}:${e.type === 'step' ? e.step : 'epoch' in e ? e.epoch : ''}`)).toEqual([
      'started:', 'step:1', 'step:2', 'epochEnd:0', 'eval:0', 'step:3', 'step:4', 'epochEnd:1', 'eval:1',
    ]);
    for (const e of iterated) {
      if (e.type === 'step') expect(e.totalSteps === 4 && Number.isFinite(e.loss) && e.lr > 0).toBe(true);
      if (e.type === 'eval') {
        expect(e.top1).toBeGreaterThanOrEqual(0);
        expect(e.top1).toBeLessThanOrEqual(1);
        expect(e.top5).toBeGreaterThanOrEqual(e.top1);
        expect(Number.isFinite(e.loss)).toBe(true);
      }
    }
    expect(summary).toMatchObject({ steps: 4, epochsCompleted: 2, aborted: false, imagesSeen: 16, skippedImages: 0, lastCheckpoint: null });
    expect(Number.isFinite(summary.finalLoss)).toBe(true);
    const after = await clf.forward(x);
    expect(after.data).not.toEqual(before.data);
    // The last eval event is the evaluation of the trained model.
    const last = iterated.at(-1) as Extract<TrainingEvent, { type: 'eval' }>;
    const e = await clf.evaluate(LABELLED, { workers: 1 });
    expect(e.top1).toBeCloseTo(last.top1, 10);
    expect(e.loss).toBeCloseTo(last.loss, 4);
  });

  it('dispose frees the classifier: later calls get E_DISPOSED, the getters answer', async () => {
    const clf = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    const count = clf.parameterCount;
    clf.dispose();
    const disposed = expect.objectContaining({ code: 'E_DISPOSED' });
    await expect(clf.forward(normalise(RAW))).rejects.toEqual(disposed);
    expect(() => clf.finetune({ ...FAST, data: LABELLED })).toThrow(disposed);
    expect(clf.parameterCount).toBe(count);
    clf[Symbol.dispose]();
  });

  it('has the classifier to itself while it trains: other calls get E_BUSY, the getters answer', async () => {
    const clf = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    const x = normalise(RAW);
    // Long enough to outlast the calls below; aborted after them.
    const run = clf.finetune({ ...FAST, data: LABELLED, epochs: 500 });
    const busy = expect.objectContaining({ code: 'E_BUSY', message: expect.stringMatching(/classifier is training/) });
    await expect(clf.forward(x)).rejects.toEqual(busy);
    await expect(clf.predict(x)).rejects.toEqual(busy);
    await expect(clf.embed(x)).rejects.toEqual(busy);
    await expect(clf.lossAndGradients(x, LABELS)).rejects.toEqual(busy);
    await expect(clf.evaluate(LABELLED, { workers: 1 })).rejects.toEqual(busy);
    await expect(clf.embedDataset(LABELLED, { workers: 1 })).rejects.toEqual(busy);
    await expect(clf.save(join(dir, 'busy-classifier.safetensors'))).rejects.toEqual(busy);
    expect(() => clf.finetune({ ...FAST, data: LABELLED })).toThrow(busy);
    expect(() => clf.dispose()).toThrow(busy);
    expect(existsSync(join(dir, 'busy-classifier.safetensors'))).toBe(false);
    expect(clf.parameterCount).toBeGreaterThan(0);
    run.abort();
    expect(await run.result).toMatchObject({ aborted: true });
    expect((await clf.forward(x)).shape).toEqual([N, 3]);
  });

  it("'linprobe' trains only the head; 'partial' only the last blocks, norm and head", async () => {
    const probe = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3, headBatchNorm: true });
    const probeBefore = join(dir, 'probe-before.safetensors');
    await probe.save(probeBefore);
    const s1 = await probe.finetune({ ...FAST, data: LABELLED, protocol: 'linprobe' }).result;
    expect(s1).toMatchObject({ steps: 4, aborted: false });
    const probeAfter = join(dir, 'probe-after.safetensors');
    await probe.save(probeAfter);
    const changed = (a: string, b: string) => {
      const x = readSafetensors(a).tensors;
      const y = readSafetensors(b).tensors;
      expect(Object.keys(y).sort()).toEqual(Object.keys(x).sort());
      return Object.keys(x).filter((k) => !Buffer.from(x[k].data.buffer).equals(Buffer.from(y[k].data.buffer))).sort();
    };
    const probeChanged = changed(probeBefore, probeAfter);
    expect(probeChanged).toContain('head.1.weight');
    expect(probeChanged.filter((k) => !k.startsWith('head.'))).toEqual([]);

    const partial = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    const partialBefore = join(dir, 'partial-before.safetensors');
    await partial.save(partialBefore);
    const s2 = await partial.finetune({ ...FAST, data: LABELLED, protocol: 'partial', partialBlocks: 1 }).result;
    expect(s2).toMatchObject({ steps: 4, aborted: false });
    const partialAfter = join(dir, 'partial-after.safetensors');
    await partial.save(partialAfter);
    const partialChanged = changed(partialBefore, partialAfter);
    expect(partialChanged).toEqual(expect.arrayContaining(['blocks.1.attn.qkv.weight', 'fc_norm.weight', 'head.weight']));
    expect(partialChanged.filter((k) => !k.startsWith('blocks.1.') && !k.startsWith('fc_norm.') && !k.startsWith('head.'))).toEqual([]);
  });

  it('writes a checkpoint and resumes from it, continuing the step count', async () => {
    const checkpointDir = join(dir, 'finetune-checkpoints');
    const options = { ...FAST, data: LABELLED, epochs: 3, checkpointDir };
    const first = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    const s1 = await first.finetune({ ...options, maxSteps: 2 }).result;
    expect(s1.steps).toBe(2);
    expect(s1.lastCheckpoint).not.toBeNull();
    expect(existsSync(s1.lastCheckpoint!)).toBe(true);

    const resumed = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    const steps: number[] = [];
    const s2 = await resumed.finetune({ ...options, maxSteps: 4, resume: checkpointDir, onProgress: (e) => e.type === 'step' && steps.push(e.step) }).result;
    expect(steps).toEqual([3, 4]);
    expect(s2).toMatchObject({ steps: 4, aborted: false });

    // The same as four steps in one go.
    const straight = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    await straight.finetune({ ...options, maxSteps: 4, checkpointDir: join(dir, 'finetune-straight') }).result;
    const x = normalise(RAW);
    const [a, b] = await Promise.all([straight.forward(x), resumed.forward(x)]);
    expect(worstMismatch(b.data, a.data, (w) => Math.max(1e-5, 1e-5 * Math.abs(w)))).toBeNull();
  });

  it('rejects bad options with a code', async () => {
    const clf = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    const codeOf = async (fn: () => unknown) => (await failure(fn)).code;
    expect(await codeOf(() => clf.finetune({ ...FAST, data: LABELLED, protocol: 'nope' as 'finetune' }))).toBe('E_ARGUMENT');
    expect(await codeOf(() => clf.finetune({ ...FAST, data: UNLABELLED }))).toBe('E_ARGUMENT');
    expect(await codeOf(() => clf.finetune({ ...FAST, data: { kind: 'memory', images: RAW, labels: [0, 1, 2, 3, 0, 1, 2, 0] } }))).toBe('E_ARGUMENT');
    expect(await codeOf(() => clf.finetune({ ...FAST, data: LABELLED, mixup: 0.8, batchSize: 3 }))).toBe('E_ARGUMENT');
    expect(await codeOf(() => clf.finetune({ ...FAST, data: LABELLED, evalData: UNLABELLED }))).toBe('E_ARGUMENT');
    expect(await codeOf(() => clf.finetune({ ...FAST, data: LABELLED, protocol: 'partial', partialBlocks: 3 }))).toBe('E_ARGUMENT');
    expect(await codeOf(() => clf.finetune({ ...FAST, data: LABELLED, epochs: 0 }))).toBe('E_ARGUMENT');
    expect(await codeOf(() => clf.finetune({ ...FAST, data: LABELLED, epochs: Number.NaN }))).toBe('E_ARGUMENT');
    const misspelt = { ...FAST, data: LABELLED, warmupEpoch: 2 } as Parameters<typeof clf.finetune>[0];
    expect(await failure(() => clf.finetune(misspelt))).toMatchObject({ code: 'E_ARGUMENT', message: expect.stringMatching(/unknown fine-tuning option 'warmupEpoch'/) });
    const native = { ...FAST, data: LABELLED, smoothing: 0.2 } as Parameters<typeof clf.finetune>[0];
    expect(await failure(() => clf.finetune(native))).toMatchObject({ code: 'E_ARGUMENT', message: "unknown fine-tuning option 'smoothing' (the option is 'labelSmoothing')" });
    const single = { ...FAST, data: LABELLED, betas: 0.9 } as unknown as Parameters<typeof clf.finetune>[0];
    expect(await failure(() => clf.finetune(single))).toMatchObject({ code: 'E_ARGUMENT', message: 'betas must be a pair of numbers [beta1, beta2], got 0.9' });
  });

  it('trains a fractional number of epochs to the nearest whole step', async () => {
    // Two steps an epoch: 1.5 epochs are three steps, one epoch completed.
    const clf = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    const lrs: number[] = [];
    const summary = await clf.finetune({ ...FAST, data: LABELLED, epochs: 1.5, onProgress: (e) => { if (e.type === 'step') lrs.push(e.lr); } }).result;
    expect(summary).toMatchObject({ steps: 3, epochsCompleted: 1, aborted: false, imagesSeen: 12 });
    // The cosine runs over 1.5 epochs, so it is past its middle (half the peak) by the last step.
    expect(lrs[2]).toBeLessThan(lrs[0]);
    expect(lrs[2]).toBeLessThan(FAST.lr / 2);
  });

  it('refuses an already-aborted signal at once with E_ABORTED, writing nothing', async () => {
    const clf = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    const checkpointDir = join(dir, 'finetune-pre-aborted');
    const error = await failure(() => clf.finetune({ ...FAST, data: LABELLED, checkpointDir, signal: AbortSignal.abort() }));
    expect(error).toMatchObject({ code: 'E_ABORTED', message: 'fine-tuning was aborted before it started' });
    expect(existsSync(checkpointDir)).toBe(false);
    expect((await clf.forward(normalise(RAW))).shape).toEqual([N, 3]);
  });

  it('stops the native run when onProgress throws, and the classifier is usable again', async () => {
    const clf = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    const handlerError = new Error('handler failed');
    const run = clf.finetune({ ...FAST, data: LABELLED, epochs: 250, onProgress: () => {
      throw handlerError;
    } });
    await expect(run.result).rejects.toBe(handlerError);
    expect((await clf.forward(normalise(RAW))).shape).toEqual([N, 3]);
  });

  it('stops on an AbortSignal with summary.aborted', async () => {
    const clf = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3 });
    const controller = new AbortController();
    const summary = await clf.finetune({
      ...FAST,
      data: LABELLED,
      epochs: 250, // 500 steps: far more than the abort lets it take
      signal: controller.signal,
      onProgress: (e) => e.type === 'step' && e.step === 2 && controller.abort(),
    }).result;
    expect(summary.aborted).toBe(true);
    expect(summary.steps).toBeGreaterThanOrEqual(2);
    expect(summary.steps).toBeLessThan(500);
    expect(summary.epochsCompleted).toBeLessThan(250);
  });
});

describe('errors', () => {
  it('load: an MAE checkpoint is E_CHECKPOINT_KEYS, a missing path E_CHECKPOINT_NOT_FOUND', async () => {
    const keys = await failure(() => VitClassifier.load(fixture('mae-tiny.weights.safetensors')));
    expect(keys.code).toBe('E_CHECKPOINT_KEYS');
    expect(keys.message).toMatch(/head/);
    expect((await failure(() => VitClassifier.load(join(dir, 'missing.safetensors')))).code).toBe('E_CHECKPOINT_NOT_FOUND');
  });

  it('fromPretrained numClasses 0 is E_CONFIG; a wrong image shape E_SHAPE; a labels mismatch E_ARGUMENT', async () => {
    const mae = tinyMae();
    expect((await failure(() => VitClassifier.fromPretrained(mae, { numClasses: 0 }))).code).toBe('E_CONFIG');
    const clf = await VitClassifier.fromPretrained(mae, { numClasses: 3 });
    expect((await failure(() => clf.forward(randomTensor([2, 3, 32, 32])))).code).toBe('E_SHAPE');
    expect((await failure(() => clf.forward(randomTensor([2, 1, 16, 16])))).code).toBe('E_SHAPE');
    expect((await failure(() => clf.forward({ data: new Float32Array(5), shape: [2, 3, 16, 16] })))).toMatchObject({ code: 'E_SHAPE' });
    const x = normalise(rawImages(2));
    expect((await failure(() => clf.lossAndGradients(x, [0]))).code).toBe('E_ARGUMENT');
    expect((await failure(() => clf.lossAndGradients(x, [0, 3]))).code).toBe('E_ARGUMENT');
    expect((await failure(() => clf.lossAndGradients(x, [0, 1], { labelSmoothing: 1 }))).code).toBe('E_ARGUMENT');
  });
});

describe('save and load', () => {
  it('round-trips to identical logits', async () => {
    const clf = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3, seed: 1 });
    await clf.finetune({ ...FAST, data: LABELLED }).result;
    const path = join(dir, 'clf.safetensors');
    await clf.save(path);
    const file = readSafetensors(path);
    expect(JSON.parse(file.metadata.config)).toMatchObject({ num_classes: 3, global_pool: true });
    expect(Object.keys(file.tensors)).toEqual(expect.arrayContaining(['fc_norm.weight', 'head.weight', 'pos_embed']));
    const loaded = await VitClassifier.load(path);
    expect(loaded.config).toEqual(clf.config);
    expect(loaded.checkpointFormat).toBe('safetensors');
    const x = normalise(RAW);
    const [a, b] = await Promise.all([clf.forward(x), loaded.forward(x)]);
    expect(b.data).toEqual(a.data);
  });

  it('round-trips a linear probe with its BatchNorm running statistics', async () => {
    const probe = await VitClassifier.fromPretrained(tinyMae(), { numClasses: 3, headBatchNorm: true });
    const x = normalise(RAW);
    const untrained = await probe.forward(x);
    await probe.finetune({ ...FAST, data: LABELLED, protocol: 'linprobe' }).result;
    const trained = await probe.forward(x);
    expect(trained.data).not.toEqual(untrained.data);
    const path = join(dir, 'probe.safetensors');
    await probe.save(path);
    const file = readSafetensors(path);
    expect(Object.keys(file.tensors)).toEqual(expect.arrayContaining(['head.0.running_mean', 'head.0.running_var', 'head.1.weight', 'head.1.bias']));
    // Training moved the running statistics off their initial 0 and 1.
    expect(file.tensors['head.0.running_mean'].data.some((v) => v !== 0)).toBe(true);
    expect(file.tensors['head.0.running_var'].data.some((v) => v !== 1)).toBe(true);
    const loaded = await VitClassifier.load(path);
    expect(loaded.config).toMatchObject({ headBatchNorm: true, numClasses: 3 });
    expect((await loaded.forward(x)).data).toEqual(trained.data);
  });
});
