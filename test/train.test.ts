// Pre-training through the facade: events, abort, resume, corrupt images, NaN, reconstruction.
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { setTimeout as sleep } from 'node:timers/promises';
import { MaskedAutoencoder, VitMaeError, encodeReconstructionGrid, writeReconstructionGrid, type MaeConfig, type TrainingEvent } from '../ts/index.js';
import { datasetSpec, passSpec } from '../ts/data.js';
import { maeNatives, type Binding } from '../ts/native.js';
import { encodePng, pngSize, randomTensor } from './helpers.js';

const TINY: MaeConfig = {
  imgSize: 16,
  patchSize: 4,
  inChans: 1,
  embedDim: 16,
  depth: 1,
  numHeads: 2,
  decoderEmbedDim: 8,
  decoderDepth: 1,
  decoderNumHeads: 2,
  mlpRatio: 4,
  normPixLoss: true,
  layerNormEps: 1e-6,
};
const dir = mkdtempSync(join(tmpdir(), 'vit-mae-train-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** 32 smooth images in [0, 1]. */
function images(n = 32): { data: Float32Array; shape: number[] } {
  const t = randomTensor([n, 1, 16, 16], 9);
  t.data.forEach((v, i) => (t.data[i] = 0.5 + 0.25 * v + 0.2 * Math.sin((i % 16) / 3)));
  return t;
}

const base = { augment: { randomResizedCrop: false, hflip: false, mean: [0.5], std: [0.25] }, batchSize: 8, workers: 1, epochs: 4, warmupEpochs: 1, lr: 5e-3 };

describe('pretrain', () => {
  it('reports steps through the iterator and the callback, and lowers the loss', async () => {
    const mae = MaskedAutoencoder.create({ config: TINY, seed: 1 });
    const seen: TrainingEvent[] = [];
    const run = mae.pretrain({ ...base, data: { kind: 'memory', images: images() }, onProgress: (e) => seen.push(e) });
    let ticks = 0;
    const timer = setInterval(() => ticks++, 1);
    const iterated: TrainingEvent[] = [];
    for await (const e of run) iterated.push(e);
    clearInterval(timer);
    const summary = await run.result;
    expect(iterated).toEqual(seen);
    const steps = iterated.filter((e) => e.type === 'step');
    expect(steps.map((e) => e.step)).toEqual([...Array(16).keys()].map((i) => i + 1));
    expect(steps.every((e) => e.totalSteps === 16 && Number.isFinite(e.loss) && e.lr >= 0 && e.imagesPerSec > 0)).toBe(true);
    expect(iterated.filter((e) => e.type === 'epochEnd').map((e) => e.epoch)).toEqual([0, 1, 2, 3]);
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    expect(mean(steps.slice(-4).map((e) => e.loss))).toBeLessThan(mean(steps.slice(0, 4).map((e) => e.loss)));
    expect(summary).toMatchObject({ steps: 16, epochsCompleted: 4, aborted: false, imagesSeen: 128, skippedImages: 0, lastCheckpoint: null });
    expect(ticks).toBeGreaterThan(0);
  });

  it('has the model to itself while it trains: other calls get E_BUSY, the getters answer, and the trained weights come back', async () => {
    const mae = MaskedAutoencoder.create({ config: TINY, seed: 2 });
    const data = { kind: 'memory', images: images() } as const;
    const x = images(2);
    const before = await mae.forward(x, { noise: randomTensor([2, 16], 3) });
    // Long enough to outlast the calls below; aborted after them and its first step.
    let stepped: () => void = () => {};
    const firstStep = new Promise<void>((resolve) => (stepped = resolve));
    const run = mae.pretrain({ ...base, data, epochs: 500, warmupEpochs: 0, onProgress: (e) => e.type === 'step' && stepped() });
    const busy = expect.objectContaining({ code: 'E_BUSY', message: expect.stringMatching(/training/) });
    await expect(mae.forward(x)).rejects.toEqual(busy);
    await expect(mae.embed(x)).rejects.toEqual(busy);
    await expect(mae.reconstruct(x)).rejects.toEqual(busy);
    await expect(mae.lossAndGradients(x)).rejects.toEqual(busy);
    await expect(mae.embedDataset(data, { workers: 1 })).rejects.toEqual(busy);
    await expect(mae.save(join(dir, 'busy.safetensors'))).rejects.toEqual(busy);
    expect(() => mae.pretrain({ ...base, data })).toThrow(busy);
    expect(() => mae.dispose()).toThrow(busy);
    expect(existsSync(join(dir, 'busy.safetensors'))).toBe(false);
    expect(mae.parameterCount).toBeGreaterThan(0);
    expect(mae.parameterShapes().cls_token).toEqual([1, 1, 16]);
    await firstStep;
    run.abort();
    const summary = await run.result;
    expect(summary.aborted).toBe(true);
    expect(summary.steps).toBeGreaterThan(0);
    const after = await mae.forward(x, { noise: randomTensor([2, 16], 3) });
    expect(after.loss).not.toBe(before.loss);
    expect(Number.isFinite(after.loss)).toBe(true);
    // And the model takes another run once the first is over.
    expect((await mae.pretrain({ ...base, data, epochs: 1 }).result).steps).toBe(4);
  });

  it('stops on an AbortSignal after the current step, leaving a checkpoint it resumes from', async () => {
    const checkpointDir = join(dir, 'abort');
    const straightDir = join(dir, 'straight');
    const data = { kind: 'memory', images: images() } as const;
    // 50 epochs of 4 steps: far more steps than the training thread can finish before the abort reaches it.
    const long = { ...base, data, epochs: 50 };
    const mae = MaskedAutoencoder.create({ config: TINY, seed: 2 });
    const controller = new AbortController();
    const run = mae.pretrain({ ...long, checkpointDir, signal: controller.signal, onProgress: (e) => e.type === 'step' && e.step === 3 && controller.abort() });
    const summary = await run.result;
    // The abort reaches the training thread while it may already be a few steps further.
    expect(summary.aborted).toBe(true);
    expect(summary.steps).toBeGreaterThanOrEqual(3);
    expect(summary.steps).toBeLessThan(200);
    expect(summary.lastCheckpoint).toBe(join(checkpointDir, `checkpoint-${String(summary.steps).padStart(8, '0')}.safetensors`));
    expect(existsSync(summary.lastCheckpoint!)).toBe(true);

    // maxSteps only truncates the run (the schedule follows the epochs), so both sides see the same learning rates.
    const maxSteps = summary.steps + 3;
    const straight = MaskedAutoencoder.create({ config: TINY, seed: 2 });
    await straight.pretrain({ ...long, maxSteps, checkpointDir: straightDir }).result;
    const resumed = MaskedAutoencoder.create({ config: TINY, seed: 2 });
    const rest = await resumed.pretrain({ ...long, maxSteps, checkpointDir, resume: checkpointDir }).result;
    expect(rest.steps).toBe(maxSteps);
    await resumed.save(join(dir, 'resumed.safetensors'));
    await straight.save(join(dir, 'straight.safetensors'));
    expect(readFileSync(join(dir, 'resumed.safetensors')).equals(readFileSync(join(dir, 'straight.safetensors')))).toBe(true);
  });

  it('skips unreadable images with a counted warning, or fails on them', async () => {
    const folder = join(dir, 'folder');
    for (const cls of ['a', 'b']) {
      mkdirSync(join(folder, cls), { recursive: true });
      for (let i = 0; i < 8; i++) writeFileSync(join(folder, cls, `${i}.png`), encodePng(20, 20, (x, y) => (x * 7 + y * 3 + i * 11) % 256));
    }
    writeFileSync(join(folder, 'a', 'broken.png'), Buffer.from('not a png at all'));
    const mae = MaskedAutoencoder.create({ config: TINY });
    const data = { kind: 'folder', path: folder } as const;
    const run = mae.pretrain({ ...base, data, epochs: 1, warmupEpochs: 0, augment: { mean: [0.5], std: [0.25] } });
    const skipped = [];
    for await (const e of run) if (e.type === 'skipped') skipped.push(e);
    expect(skipped).toHaveLength(1);
    expect(skipped[0].message).toMatch(/broken\.png/);
    expect((await run.result).skippedImages).toBe(1);

    const strict = mae.pretrain({ ...base, data, epochs: 1, warmupEpochs: 0, skipCorrupt: false, augment: { mean: [0.5], std: [0.25] } });
    await expect(strict.result).rejects.toMatchObject({ code: 'E_IO', message: expect.stringMatching(/broken\.png/) });
  });

  it('stops with E_NON_FINITE_LOSS naming the step, keeping the last good checkpoint', async () => {
    const checkpointDir = join(dir, 'diverged');
    const mae = MaskedAutoencoder.create({ config: TINY });
    // An absurd learning rate from the first step blows the weights up at once.
    const run = mae.pretrain({ ...base, lr: 1e30, warmupEpochs: 0, checkpointDir, checkpointEvery: 1, data: { kind: 'memory', images: images() } });
    const error = await run.result.catch((e: unknown) => e);
    expect(error).toBeInstanceOf(VitMaeError);
    expect(error).toMatchObject({ code: 'E_NON_FINITE_LOSS', message: expect.stringMatching(/at step 2\b.*checkpoint-00000001\.safetensors/) });
    expect(existsSync(join(checkpointDir, 'checkpoint-00000001.safetensors'))).toBe(true);
    expect(existsSync(join(checkpointDir, 'checkpoint-00000002.safetensors'))).toBe(false);
  });

  it('stops the native run when onProgress throws: the result rejects with that error, nothing more is written, and the model is usable again', async () => {
    const checkpointDir = join(dir, 'throwing');
    const mae = MaskedAutoencoder.create({ config: TINY, seed: 5 });
    const failure = new Error('the progress handler failed');
    let events = 0;
    // 500 epochs of 4 steps, a checkpoint after each: a run left going would keep writing.
    const run = mae.pretrain({ ...base, data: { kind: 'memory', images: images() }, epochs: 500, checkpointDir, checkpointEvery: 1, onProgress: () => {
      events += 1;
      if (events === 2) throw failure;
    } });
    await expect(run.result).rejects.toBe(failure);
    const written = readdirSync(checkpointDir).sort();
    expect(written.length).toBeGreaterThan(0);
    await sleep(500);
    expect(readdirSync(checkpointDir).sort()).toEqual(written);
    expect(events).toBe(2);
    const out = await mae.forward(images(2));
    expect(Number.isFinite(out.loss)).toBe(true);
  });

  it('checks the checkpoint folder before the first step: one that cannot be written is E_IO naming it, with nothing trained', async () => {
    const file = join(dir, 'not-a-folder');
    writeFileSync(file, 'a file');
    const checkpointDir = join(file, 'checkpoints');
    const mae = MaskedAutoencoder.create({ config: TINY, seed: 6 });
    const seen: TrainingEvent[] = [];
    const run = mae.pretrain({ ...base, data: { kind: 'memory', images: images() }, checkpointDir, onProgress: (e) => seen.push(e) });
    await expect(run.result).rejects.toMatchObject({ code: 'E_IO', message: expect.stringContaining(checkpointDir) });
    expect(seen).toEqual([{ type: 'started', rank: 0, worldSize: 1, localRank: 0, backend: 'none' }]);
  });

  it('fails on a folder whose images are all unreadable, naming it and the count, rather than training on nothing', async () => {
    const folder = join(dir, 'all-broken');
    mkdirSync(folder, { recursive: true });
    for (let i = 0; i < 16; i++) writeFileSync(join(folder, `${i}.png`), Buffer.from(`not a png ${i}`));
    const mae = MaskedAutoencoder.create({ config: TINY, seed: 7 });
    const steps: TrainingEvent[] = [];
    const run = mae.pretrain({ ...base, data: { kind: 'folder', path: folder }, epochs: 1, onProgress: (e) => e.type === 'step' && steps.push(e) });
    await expect(run.result).rejects.toMatchObject({ code: 'E_ARGUMENT', message: expect.stringMatching(/step 1 .*no images: all 8 images .*all-broken/) });
    expect(steps).toEqual([]);
  });

  it('refuses an already-aborted signal at once with E_ABORTED: no step, no checkpoint, the model free', async () => {
    const checkpointDir = join(dir, 'pre-aborted');
    const mae = MaskedAutoencoder.create({ config: TINY, seed: 8 });
    for (let i = 0; i < 5; i++) {
      expect(() => mae.pretrain({ ...base, data: { kind: 'memory', images: images() }, checkpointDir, signal: AbortSignal.abort() })).toThrow(
        expect.objectContaining({ code: 'E_ABORTED', message: expect.stringMatching(/pre-training was aborted before it started/) }),
      );
    }
    expect(existsSync(checkpointDir)).toBe(false);
    expect(Number.isFinite((await mae.forward(images(2))).loss)).toBe(true);
  });

  it('refuses to resume with another batch size, naming both', async () => {
    const checkpointDir = join(dir, 'resume-batch');
    const data = { kind: 'memory', images: images() } as const;
    await MaskedAutoencoder.create({ config: TINY, seed: 9 }).pretrain({ ...base, data, maxSteps: 2, checkpointDir }).result;
    const other = MaskedAutoencoder.create({ config: TINY, seed: 9 });
    const run = other.pretrain({ ...base, data, batchSize: 16, maxSteps: 4, checkpointDir, resume: checkpointDir });
    await expect(run.result).rejects.toMatchObject({ code: 'E_ARGUMENT', message: expect.stringMatching(/batchSize 16 on 1 rank\(s\).*written with batchSize 8 on 1 rank/) });
    expect((await other.pretrain({ ...base, data, maxSteps: 4, checkpointDir, resume: checkpointDir }).result).steps).toBe(4);
  });

  it('the binding gives each event kind its own fields', async () => {
    const mae = MaskedAutoencoder.create({ config: TINY, seed: 10 });
    const native = maeNatives.get(mae);
    if (!native) throw new Error('no native model');
    const drain = async (job: Binding.NativeJob) => {
      const events: Binding.NativeJobEvent[] = [];
      for (;;) {
        const event = await job.nextEvent();
        events.push(event);
        if (event.type === 'embedded' || event.type === 'trained' || event.type === 'evaluated') return events;
      }
    };
    const data = datasetSpec({ kind: 'memory', images: images() });
    const pass = await drain(native.embedDataset(data, passSpec(1, { batchSize: 8, workers: 1 }), 'mean'));
    const started = { type: 'started', rank: 0, worldSize: 1, localRank: 0, backend: 'none' };
    expect(pass).toEqual([started, ...[8, 16, 24, 32].map((done) => ({ type: 'progress', images: done, totalImages: 32 })), { type: 'embedded' }]);

    const config = JSON.stringify({ epochs: 1, warmupEpochs: 0, lr: 1e-3 });
    const run = await drain(native.pretrain(data, passSpec(1, { batchSize: 8, workers: 1 }), config));
    const keys = (type: string) => run.filter((e) => e.type === type).map((e) => Object.keys(e).sort());
    expect(run[0]).toEqual(started);
    expect(keys('step')).toEqual(Array(4).fill(['epoch', 'etaSeconds', 'imagesPerSec', 'loss', 'lr', 'step', 'totalSteps', 'type']));
    expect(keys('epochEnd')).toEqual([['epoch', 'meanLoss', 'type']]);
    expect(run.at(-1)).toMatchObject({ type: 'trained', summary: { steps: 4, epochsCompleted: 1, aborted: false } });
  });

  it('rejects bad options with clear errors', async () => {
    const mae = MaskedAutoencoder.create({ config: TINY });
    const data = { kind: 'memory', images: images() } as const;
    expect(() => mae.pretrain({ ...base, data, batchSize: 0 })).toThrow(/batchSize/);
    expect(() => mae.pretrain({ ...base, data, maskRatio: 1 })).toThrow(expect.objectContaining({ code: 'E_MASK_RATIO' }));
    expect(() => mae.pretrain({ ...base, data: { kind: 'folder', path: join(dir, 'nope') } })).toThrow(expect.objectContaining({ code: 'E_ARGUMENT' }));
    expect(() => mae.pretrain({ ...base, data, augment: { mean: [0.5, 0.5] } })).toThrow(/mean and std/);
    // JSON would turn these into null, the default: they must be errors instead.
    expect(() => mae.pretrain({ ...base, data, lr: Number.NaN })).toThrow(expect.objectContaining({ code: 'E_ARGUMENT', message: expect.stringMatching(/^lr must be a finite number/) }));
    expect(() => mae.pretrain({ ...base, data, epochs: Infinity })).toThrow(expect.objectContaining({ code: 'E_ARGUMENT', message: expect.stringMatching(/^epochs/) }));
    expect(() => mae.pretrain({ ...base, data, epochs: 0 })).toThrow(expect.objectContaining({ code: 'E_ARGUMENT', message: expect.stringMatching(/epochs must be a positive number/) }));
    // A misspelt option is refused, not trained with the default.
    const misspelt = { ...base, data, warmupEpoch: 2 } as Parameters<typeof mae.pretrain>[0];
    expect(() => mae.pretrain(misspelt)).toThrow(expect.objectContaining({ code: 'E_ARGUMENT', message: expect.stringMatching(/unknown pre-training option 'warmupEpoch'/) }));
    // Keys JSON would drop or the facade would overwrite are refused on the JS side.
    const callback = { ...base, data, onProgres: () => {} } as Parameters<typeof mae.pretrain>[0];
    expect(() => mae.pretrain(callback)).toThrow(expect.objectContaining({ code: 'E_ARGUMENT', message: "unknown pre-training option 'onProgres'" }));
    const native = { ...base, data, beta2: 0.9 } as Parameters<typeof mae.pretrain>[0];
    expect(() => mae.pretrain(native)).toThrow(expect.objectContaining({ code: 'E_ARGUMENT', message: "unknown pre-training option 'beta2' (the option is 'betas')" }));
    // betas is a pair: anything else would be ignored for the default.
    for (const betas of [0.9, [0.9], [0.9, 0.95, 0.99], [0.9, '0.95'], null]) {
      const options = { ...base, data, betas } as unknown as Parameters<typeof mae.pretrain>[0];
      expect(() => mae.pretrain(options), JSON.stringify(betas)).toThrow(expect.objectContaining({ code: 'E_ARGUMENT', message: expect.stringMatching(/^betas must be a pair of numbers/) }));
    }
    expect(() => mae.pretrain({ ...base, data, betas: [0.9, 1] })).toThrow(expect.objectContaining({ code: 'E_ARGUMENT', message: 'beta2 must be in [0, 1), got 1' }));
  });
});

describe('reconstruct', () => {
  it('returns masked, reconstruction and pasted images consistent with the mask', async () => {
    const mae = MaskedAutoencoder.create({ config: { ...TINY, normPixLoss: false }, seed: 4 });
    const x = randomTensor([2, 1, 16, 16], 5);
    const r = await mae.reconstruct(x, { maskRatio: 0.5 });
    for (const t of [r.masked, r.reconstruction, r.pasted]) expect(t.shape).toEqual([2, 1, 16, 16]);
    for (let n = 0; n < 2; n++)
      for (let py = 0; py < 4; py++)
        for (let px = 0; px < 4; px++) {
          const removed = r.mask.data[n * 16 + py * 4 + px] === 1;
          const i = n * 256 + (py * 4 + 1) * 16 + px * 4 + 2; // a pixel inside the patch
          expect(r.masked.data[i] + 0).toBe(removed ? 0 : x.data[i]);
          expect(r.pasted.data[i]).toBeCloseTo(removed ? r.reconstruction.data[i] : x.data[i], 6);
        }
    const png = join(dir, 'grid.png');
    await writeReconstructionGrid(png, r, x, { mean: [0.5], std: [0.25] });
    // 4 columns and 2 rows of 128-pixel cells (16 px enlarged 8x) with 2-pixel gaps.
    expect(pngSize(readFileSync(png))).toEqual({ width: 4 * 128 + 5 * 2, height: 2 * 128 + 3 * 2 });
  });

  it("pre-trains a 'pca' target: fits its basis first, lowers the loss, saves the basis, and reconstructs pixels", async () => {
    // Patches of 16 values, 4 coefficients.
    const config = { ...TINY, normPixLoss: false, target: 'pca' as const, pcaComponents: 4 };
    const mae = MaskedAutoencoder.create({ config, seed: 2 });
    expect(mae.config).toMatchObject({ target: 'pca', pcaComponents: 4, normPixLoss: false });
    const x = randomTensor([2, 1, 16, 16], 5);
    await expect(mae.reconstruct(x)).rejects.toMatchObject({ code: 'E_CONFIG', message: expect.stringMatching(/no PCA basis/) });
    const run = mae.pretrain({ ...base, data: { kind: 'memory', images: images() } });
    const events: TrainingEvent[] = [];
    for await (const e of run) events.push(e);
    await run.result;
    const fitted = events.filter((e) => e.type === 'pcaBasis');
    expect(fitted).toEqual([{ type: 'pcaBasis', components: 4, keptVariance: expect.any(Number), images: 32, patches: 32 * 16 }]);
    const kept = fitted[0].type === 'pcaBasis' ? fitted[0].keptVariance : NaN;
    expect(kept).toBeGreaterThan(4 / 16);
    expect(kept).toBeLessThanOrEqual(1);
    expect(events.findIndex((e) => e.type === 'pcaBasis')).toBeLessThan(events.findIndex((e) => e.type === 'step'));
    const losses = events.flatMap((e) => (e.type === 'step' ? [e.loss] : []));
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    expect(mean(losses.slice(-4))).toBeLessThan(mean(losses.slice(0, 4)));

    const r = await mae.reconstruct(x, { maskRatio: 0.5 });
    for (const t of [r.masked, r.reconstruction, r.pasted]) expect(t.shape).toEqual([2, 1, 16, 16]);
    expect(r.reconstruction.data.every(Number.isFinite)).toBe(true);
    expect((await mae.forward(x)).pred.shape).toEqual([2, 16, 4]);

    const path = join(dir, 'pca.safetensors');
    await mae.save(path);
    const loaded = await MaskedAutoencoder.load(path);
    expect(loaded.config).toEqual(mae.config);
    const noise = randomTensor([2, 16], 6);
    expect((await loaded.forward(x, { noise })).loss).toBe((await mae.forward(x, { noise })).loss);
  });

  it("refuses a target that contradicts normPixLoss, and pcaComponents without a 'pca' target", () => {
    expect(() => MaskedAutoencoder.create({ config: { ...TINY, target: 'pixels' } })).toThrow(expect.objectContaining({ code: 'E_CONFIG', message: expect.stringMatching(/contradicts/) }));
    expect(() => MaskedAutoencoder.create({ config: { ...TINY, normPixLoss: false, pcaComponents: 3 } })).toThrow(expect.objectContaining({ code: 'E_CONFIG', message: expect.stringMatching(/only to target 'pca'/) }));
    expect(() => MaskedAutoencoder.create({ config: { ...TINY, normPixLoss: false, target: 'pca', pcaComponents: 17 } })).toThrow(expect.objectContaining({ code: 'E_CONFIG' }));
    expect(MaskedAutoencoder.create({ config: { ...TINY, target: 'normPixels' } }).config.normPixLoss).toBe(true);
    expect(MaskedAutoencoder.create({ config: { ...TINY, normPixLoss: false, target: 'pca' } }).config.pcaComponents).toBe(2);
  });

  it('encodes the grid as PNG bytes, the same as the file written', async () => {
    const mae = MaskedAutoencoder.create({ config: { ...TINY, normPixLoss: false }, seed: 4 });
    const x = randomTensor([3, 1, 16, 16], 6);
    const r = await mae.reconstruct(x, { maskRatio: 0.5 });
    const bytes = await encodeReconstructionGrid(r, x, { mean: [0.5], std: [0.25] });
    expect(bytes).toBeInstanceOf(Buffer);
    expect(bytes.subarray(0, 8)).toEqual(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]));
    expect(bytes.subarray(12, 16).toString('ascii')).toBe('IHDR');
    expect(pngSize(bytes)).toEqual({ width: 4 * 128 + 5 * 2, height: 3 * 128 + 4 * 2 });
    const png = join(dir, 'grid-bytes.png');
    await writeReconstructionGrid(png, r, x, { mean: [0.5], std: [0.25] });
    expect(readFileSync(png).equals(bytes)).toBe(true);
  });
});
