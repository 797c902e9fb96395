// The facade's behaviour: creation, presets, forward outputs, masking, save/load.
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { MaskedAutoencoder, VitClassifier, inspectCheckpoint, setAllowTf32, type MaeConfig } from '../ts/index.js';
import { fixture, randomTensor, readSafetensors, writeHuggingFaceEncoder, writeSafetensors } from './helpers.js';

const SMALL: MaeConfig = {
  imgSize: 32,
  patchSize: 8,
  inChans: 3,
  embedDim: 32,
  depth: 2,
  numHeads: 2,
  decoderEmbedDim: 16,
  decoderDepth: 1,
  decoderNumHeads: 2,
  mlpRatio: 4,
  normPixLoss: false,
  layerNormEps: 1e-6,
};
const L = 16;
const dir = mkdtempSync(join(tmpdir(), 'vit-mae-api-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('MaskedAutoencoder.create', () => {
  it('builds the published base model from its preset', () => {
    const mae = MaskedAutoencoder.create({ preset: 'mae_vit_base_patch16', seed: 0 });
    expect(mae.config).toMatchObject({ imgSize: 224, patchSize: 16, embedDim: 768, depth: 12, numHeads: 12, decoderEmbedDim: 512, decoderDepth: 8, decoderNumHeads: 16 });
    // 111,907,840 values in the published state dict, less the fixed position
    // embeddings (197 x 768 and 197 x 512).
    expect(mae.parameterCount).toBe(111_907_840 - 197 * 768 - 197 * 512);
    expect(mae.device).toBe('cpu');
    expect(mae.checkpointFormat).toBeNull();
  });

  it('takes a full config, or a preset with overrides', () => {
    expect(MaskedAutoencoder.create({ config: SMALL }).config).toEqual(SMALL);
    const patched = MaskedAutoencoder.create({ preset: 'mae_vit_tiny_patch16', config: { normPixLoss: true, depth: 2 } });
    expect(patched.config).toMatchObject({ embedDim: 192, depth: 2, normPixLoss: true });
  });

  it('lists the presets with their configs', () => {
    const presets = MaskedAutoencoder.presets();
    expect(presets.mae_vit_huge_patch14).toMatchObject({ patchSize: 14, embedDim: 1280, depth: 32, numHeads: 16, decoderEmbedDim: 512 });
    expect(presets.mae_vit_large_patch16).toMatchObject({ embedDim: 1024, depth: 24, numHeads: 16 });
  });

  it('initialises as published and is reproducible by seed', () => {
    const a = MaskedAutoencoder.create({ config: SMALL, seed: 7 });
    const b = MaskedAutoencoder.create({ config: SMALL, seed: 7 });
    const c = MaskedAutoencoder.create({ config: SMALL, seed: 8 });
    const shapes = a.parameterShapes();
    expect(shapes['patch_embed.proj.weight']).toEqual([32, 3, 8, 8]);
    expect(shapes['blocks.1.attn.qkv.weight']).toEqual([96, 32]);
    expect(shapes).not.toHaveProperty('pos_embed');
    return Promise.all([a, b, c].map((m) => m.forward(randomTensor([1, 3, 32, 32]), { noise: randomTensor([1, L], 3) }))).then(([oa, ob, oc]) => {
      expect(oa.pred.data).toEqual(ob.pred.data);
      expect(oa.pred.data).not.toEqual(oc.pred.data);
    });
  });
});

describe('forward', () => {
  const mae = MaskedAutoencoder.create({ config: SMALL, seed: 1 });
  const images = randomTensor([3, 3, 32, 32]);

  it('returns loss, pred, mask, idsRestore and latent with the published shapes', async () => {
    const out = await mae.forward(images, { maskRatio: 0.75 });
    expect(Number.isFinite(out.loss)).toBe(true);
    expect(out.pred.shape).toEqual([3, L, 8 * 8 * 3]);
    expect(out.mask.shape).toEqual([3, L]);
    expect(out.idsRestore.shape).toEqual([3, L]);
    expect(out.latent.shape).toEqual([3, 1 + 4, 32]);
    for (let n = 0; n < 3; n++) {
      const mask = out.mask.data.subarray(n * L, (n + 1) * L);
      const restore = Array.from(out.idsRestore.data.subarray(n * L, (n + 1) * L));
      expect(mask.reduce((a, b) => a + b, 0)).toBe(12);
      expect([...restore].sort((x, y) => x - y)).toEqual([...Array(L).keys()]);
      // A patch is removed exactly when its shuffled position is past the kept ones.
      restore.forEach((pos, l) => expect(mask[l]).toBe(pos >= 4 ? 1 : 0));
    }
  });

  it('keeps the patches with the smallest noise', async () => {
    const noise = randomTensor([3, L], 11);
    const out = await mae.forward(images, { maskRatio: 0.5, noise });
    for (let n = 0; n < 3; n++) {
      const row = Array.from(noise.data.subarray(n * L, (n + 1) * L));
      const threshold = [...row].sort((a, b) => a - b)[7];
      row.forEach((v, l) => expect(out.mask.data[n * L + l]).toBe(v <= threshold ? 0 : 1));
    }
  });

  it('draws masks from the seeded RNG when no noise is given', async () => {
    const first = MaskedAutoencoder.create({ config: SMALL, seed: 5 });
    const again = MaskedAutoencoder.create({ config: SMALL, seed: 5 });
    const [a, b] = await Promise.all([first.forward(images), again.forward(images)]);
    expect(a.mask.data).toEqual(b.mask.data);
    const next = await first.forward(images);
    expect(next.mask.data).not.toEqual(a.mask.data);
  });

  it('supports block and grid masking', async () => {
    const grid = await mae.forward(images, { masking: 'grid' });
    const kept = [0, 2, 8, 10]; // even row and even column of the 4x4 grid
    for (let l = 0; l < L; l++) expect(grid.mask.data[l]).toBe(kept.includes(l) ? 0 : 1);
    const block = await mae.forward(images, { masking: 'block', maskRatio: 0.5 });
    for (let n = 0; n < 3; n++) expect(block.mask.data.subarray(n * L, (n + 1) * L).reduce((a, b) => a + b, 0)).toBe(8);
  });

  it('with mask ratio 0 sees every patch and has zero loss', async () => {
    const out = await mae.forward(images, { maskRatio: 0 });
    expect(out.latent.shape).toEqual([3, 1 + L, 32]);
    expect(out.loss).toBe(0);
  });

  it('with encoderMaskToken (Table 1c), encodes every patch and trains the encoder token', async () => {
    const withTokens = MaskedAutoencoder.create({ config: { ...SMALL, encoderMaskToken: true }, seed: 1 });
    expect(withTokens.config.encoderMaskToken).toBe(true);
    expect(withTokens.parameterShapes()['encoder_mask_token']).toEqual([1, 1, 32]);
    expect(mae.parameterShapes()).not.toHaveProperty('encoder_mask_token');
    const out = await withTokens.forward(images, { maskRatio: 0.75 });
    expect(out.latent.shape).toEqual([3, 1 + L, 32]);
    const { gradients } = await withTokens.lossAndGradients(images, { maskRatio: 0.75 });
    expect(gradients['encoder_mask_token'].data.some((v) => v !== 0)).toBe(true);
  });

  it('does not block the event loop', async () => {
    const base = MaskedAutoencoder.create({ preset: 'mae_vit_tiny_patch16' });
    let ticks = 0;
    const timer = setInterval(() => ticks++, 1);
    await base.lossAndGradients(randomTensor([2, 3, 224, 224]));
    clearInterval(timer);
    expect(ticks).toBeGreaterThan(5);
  });
});

describe('save and load', () => {
  it('round-trips bit-identically with the config in the metadata', async () => {
    const mae = MaskedAutoencoder.create({ config: { ...SMALL, normPixLoss: true }, seed: 3 });
    const path = join(dir, 'model.safetensors');
    await mae.save(path);
    expect(readdirSync(dir).filter((f) => f.includes('tmp'))).toEqual([]);
    const file = readSafetensors(path);
    expect(JSON.parse(file.metadata.config)).toMatchObject({ embed_dim: 32, norm_pix_loss: true, decoder_num_heads: 2 });
    expect(Object.keys(file.tensors)).toContain('blocks.1.mlp.fc2.bias');
    expect(Object.keys(file.tensors)).toContain('decoder_pos_embed');

    const loaded = await MaskedAutoencoder.load(path);
    expect(loaded.config).toEqual(mae.config);
    expect(loaded.checkpointFormat).toBe('safetensors');
    const again = join(dir, 'again.safetensors');
    await loaded.save(again);
    expect(readFileSync(again).equals(readFileSync(path))).toBe(true);
  });

  it('loads an encoder-only checkpoint with a fresh decoder, flagged', async () => {
    const full = readSafetensors(fixture('mae-tiny.weights.safetensors'));
    const encoder = Object.fromEntries(
      Object.entries(full.tensors).filter(([k]) => !k.startsWith('decoder') && k !== 'mask_token'),
    );
    const path = join(dir, 'encoder.safetensors');
    writeFileSync(path, writeSafetensors(encoder, full.metadata));
    const mae = await MaskedAutoencoder.load(path);
    expect(mae.freshDecoder).toBe(true);
    const reference = readSafetensors(fixture('mae-tiny.case.safetensors'));
    const out = await mae.forward(reference.tensors.imgs, { noise: reference.tensors.noise });
    // The encoder is the checkpoint's, so its output matches the reference.
    const want = reference.tensors.latent.data;
    expect(out.latent.data.every((v, i) => Math.abs(v - want[i]) <= 1e-4)).toBe(true);
  });

  it('converts weights stored in f64 to f32 and says which', async () => {
    const full = readSafetensors(fixture('mae-tiny.weights.safetensors'));
    const norm = full.tensors['norm.weight'];
    const path = join(dir, 'f64.safetensors');
    writeFileSync(path, writeSafetensors({ ...full.tensors, 'norm.weight': { data: Float64Array.from(norm.data), shape: norm.shape } }, full.metadata));
    const mae = await MaskedAutoencoder.load(path);
    expect(mae.convertedDtypes).toEqual({ 'norm.weight': 'f64' });
    expect((await MaskedAutoencoder.load(fixture('mae-tiny.weights.safetensors'))).convertedDtypes).toEqual({});
    expect(MaskedAutoencoder.create({ config: SMALL }).convertedDtypes).toEqual({});
  });

  it('loads a Hugging Face ViTMAEModel folder (the encoder alone) with a fresh decoder', async () => {
    const folder = join(dir, 'encoder.hf');
    writeHuggingFaceEncoder(folder);
    const mae = await MaskedAutoencoder.load(folder);
    expect([mae.checkpointFormat, mae.freshDecoder, mae.ignoredConfigFields]).toEqual(['huggingface', true, []]);
    const reference = readSafetensors(fixture('mae-tiny.case.safetensors'));
    const out = await mae.forward(reference.tensors.imgs, { noise: reference.tensors.noise });
    const want = reference.tensors.latent.data;
    expect(out.latent.data.every((v, i) => Math.abs(v - want[i]) <= 1e-4)).toBe(true);
  });

  it('lists the Hugging Face config fields it does not follow', async () => {
    const folder = join(dir, 'extra.hf');
    mkdirSync(folder);
    copyFileSync(fixture('mae-tiny.hf/model.safetensors'), join(folder, 'model.safetensors'));
    const config = JSON.parse(readFileSync(fixture('mae-tiny.hf/config.json'), 'utf8'));
    writeFileSync(join(folder, 'config.json'), JSON.stringify({ ...config, mask_ratio: 0.6, hidden_dropout_prob: 0.1, transformers_version: '5.25.0' }));
    const warnings: Error[] = [];
    const onWarning = (w: Error) => warnings.push(w);
    process.on('warning', onWarning);
    try {
      expect((await MaskedAutoencoder.load(folder)).ignoredConfigFields).toEqual(['hidden_dropout_prob', 'mask_ratio']);
      expect((await MaskedAutoencoder.load(fixture('mae-tiny.hf'))).ignoredConfigFields).toEqual([]);
      await VitClassifier.fromPretrained(folder, { numClasses: 2 });
      await new Promise((resolve) => setImmediate(resolve)); // warnings are emitted on the next tick
    } finally {
      process.off('warning', onWarning);
    }
    // One warning per load of the folder with extra fields (the MAE, the classifier's), none for the other.
    expect(warnings.map((w) => [w.name, (w as Error & { code?: string }).code, w.message])).toEqual(
      Array(2).fill(['VitMaeWarning', 'VIT_MAE_IGNORED_CONFIG_FIELDS', `${folder}: config.json fields not followed: hidden_dropout_prob, mask_ratio`]),
    );
    expect(MaskedAutoencoder.create({ config: SMALL }).ignoredConfigFields).toEqual([]);
  });
});

describe('precision', () => {
  it('computes in bf16 on f32 weights, giving f32 gradients close to f32 ones', async () => {
    const images = randomTensor([2, 3, 32, 32]);
    const noise = randomTensor([2, L], 5);
    const f32 = MaskedAutoencoder.create({ config: SMALL, seed: 3 });
    const bf16 = MaskedAutoencoder.create({ config: SMALL, seed: 3, precision: 'bf16' });
    expect(f32.precision).toBe('f32');
    expect(bf16.precision).toBe('bf16');
    const [a, b] = await Promise.all([f32, bf16].map((m) => m.lossAndGradients(images, { noise })));
    expect(b.loss).not.toBe(a.loss);
    expect(Math.abs(b.loss - a.loss)).toBeLessThan(0.01 * a.loss);
    const name = 'blocks.0.mlp.fc1.weight';
    const [ga, gb] = [a.gradients[name].data, b.gradients[name].data];
    expect(gb).toBeInstanceOf(Float32Array);
    const scale = ga.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
    const worst = ga.reduce((m, v, i) => Math.max(m, Math.abs(v - gb[i])), 0);
    expect(worst).toBeGreaterThan(0);
    expect(worst).toBeLessThan(0.02 * scale);
  });

  it('loads a checkpoint in bf16', async () => {
    const mae = await MaskedAutoencoder.load(fixture('mae-tiny.weights.safetensors'), { precision: 'bf16' });
    expect(mae.precision).toBe('bf16');
  });

  it('takes the TF32 switch (no effect on the CPU)', async () => {
    const mae = MaskedAutoencoder.create({ config: SMALL, seed: 3 });
    const images = randomTensor([1, 3, 32, 32]);
    const noise = randomTensor([1, L], 5);
    const before = await mae.forward(images, { noise });
    setAllowTf32(true);
    try {
      expect((await mae.forward(images, { noise })).loss).toBe(before.loss);
    } finally {
      setAllowTf32(false);
    }
  });
});

describe('inspectCheckpoint', () => {
  it('reads tensors and config without building a model, naming what the file does not tell', async () => {
    const pth = await inspectCheckpoint(fixture('mae-tiny.pth'));
    expect(pth.format).toBe('pth');
    expect(pth.tensors['patch_embed.proj.weight']).toEqual([48, 3, 4, 4]);
    expect(Object.keys(pth.tensors)).toHaveLength(62);
    expect(pth.config).toMatchObject({ imgSize: 32, patchSize: 4, inChans: 3, embedDim: 48, depth: 2, decoderEmbedDim: 32, decoderDepth: 2, mlpRatio: 4 });
    expect(pth.unknown).toEqual(['numHeads', 'decoderNumHeads']);
    // safetensors carries its config in the metadata: nothing is unknown.
    const st = await inspectCheckpoint(fixture('mae-tiny.weights.safetensors'));
    expect(st).toMatchObject({ format: 'safetensors', unknown: [], config: { numHeads: 3, decoderNumHeads: 4 } });
    await expect(inspectCheckpoint(fixture('missing.pth'))).rejects.toMatchObject({ code: 'E_CHECKPOINT_NOT_FOUND' });
  });
});

describe('dispose', () => {
  it('frees the weights: later calls get E_DISPOSED, the getters answer, a second dispose does nothing', async () => {
    const mae = MaskedAutoencoder.create({ config: SMALL, seed: 1 });
    const images = randomTensor([1, 3, 32, 32], 2);
    const count = mae.parameterCount;
    mae.dispose();
    const disposed = expect.objectContaining({ code: 'E_DISPOSED', message: expect.stringMatching(/disposed/) });
    await expect(mae.forward(images)).rejects.toEqual(disposed);
    await expect(mae.embed(images)).rejects.toEqual(disposed);
    await expect(mae.save(join(dir, 'disposed.safetensors'))).rejects.toEqual(disposed);
    expect(() => mae.pretrain({ data: { kind: 'memory', images }, batchSize: 1 })).toThrow(disposed);
    expect(mae.parameterCount).toBe(count);
    expect(mae.config.embedDim).toBe(SMALL.embedDim);
    expect(() => mae.dispose()).not.toThrow();
    // Symbol.dispose is the same call, for `using`.
    const other = MaskedAutoencoder.create({ config: SMALL, seed: 1 });
    other[Symbol.dispose]();
    await expect(other.forward(images)).rejects.toEqual(disposed);
  });

  it('is refused while the model trains; a call issued before it finishes or rejects with E_DISPOSED', async () => {
    const mae = MaskedAutoencoder.create({ config: SMALL, seed: 1 });
    const images = randomTensor([8, 3, 32, 32], 4);
    images.data.forEach((v, i) => (images.data[i] = 0.5 + 0.1 * v));
    const run = mae.pretrain({ data: { kind: 'memory', images }, batchSize: 4, epochs: 1, warmupEpochs: 0, workers: 1, augment: { randomResizedCrop: false, hflip: false } });
    expect(() => mae.dispose()).toThrow(expect.objectContaining({ code: 'E_BUSY' }));
    await run.result;
    // A forward pass issued just before: computing already (it finishes) or still queued
    // (it is refused); never a crash or a result from freed weights.
    const pending = mae.forward(images).then(
      (out) => out.loss,
      (e: { code: string }) => e.code,
    );
    mae.dispose();
    const outcome = await pending;
    expect(outcome === 'E_DISPOSED' || Number.isFinite(outcome), String(outcome)).toBe(true);
  });

  it('200 base-sized models created and disposed in turn leave RSS where it started', () => {
    const mb = () => process.memoryUsage().rss / 2 ** 20;
    MaskedAutoencoder.create({ preset: 'mae_vit_base_patch16', seed: 0 }).dispose();
    const start = mb();
    let peak = start;
    for (let i = 0; i < 200; i++) {
      MaskedAutoencoder.create({ preset: 'mae_vit_base_patch16', seed: i }).dispose();
      peak = Math.max(peak, mb());
    }
    // One model's weights are 450 MB: never two alive at once, and none left behind.
    expect(peak - start).toBeLessThan(600);
    expect(mb() - start).toBeLessThan(64);
  }, 600_000);
});
