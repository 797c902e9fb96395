// Bad input rejects with a VitMaeError carrying a code and a message naming the
// problem; the process keeps running.
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { ERROR_CODES, MaskedAutoencoder, VitClassifier, VitMaeError, encodeReconstructionGrid, loadImages, setAllowTf32, writeReconstructionGrid, type ErrorCode, type MaeConfig, type Tensor } from '../ts/index.js';
import { binding, rethrow } from '../ts/native.js';
import { fixture, randomTensor, readSafetensors, writeSafetensors, zip } from './helpers.js';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const dir = mkdtempSync(join(tmpdir(), 'vit-mae-errors-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function rejection(promise: Promise<unknown> | (() => unknown)): Promise<VitMaeError> {
  try {
    await (typeof promise === 'function' ? promise() : promise);
  } catch (error) {
    expect(error).toBeInstanceOf(VitMaeError);
    expect(error).toBeInstanceOf(Error);
    return error as VitMaeError;
  }
  throw new Error('expected a rejection');
}

async function expectCode(promise: Promise<unknown> | (() => unknown), code: ErrorCode, message: RegExp): Promise<void> {
  const error = await rejection(promise);
  expect(error.code).toBe(code);
  expect(error.message).toMatch(message);
}

const tiny = readSafetensors(fixture('mae-tiny.weights.safetensors'));
const mae = await MaskedAutoencoder.load(fixture('mae-tiny.weights.safetensors'));
const images = randomTensor([2, 3, 32, 32]);

function writeCheckpoint(name: string, tensors: Record<string, { data: Float32Array; shape: number[] }>): string {
  const path = join(dir, name);
  writeFileSync(path, writeSafetensors(tensors, tiny.metadata));
  return path;
}

describe('inputs', () => {
  it('rejects images of the wrong rank, channels or size', async () => {
    await expectCode(mae.forward(randomTensor([3, 32, 32])), 'E_SHAPE', /\[N, 3, 32, 32\].*\[3, 32, 32\]/);
    await expectCode(mae.forward(randomTensor([1, 1, 32, 32])), 'E_SHAPE', /\[1, 1, 32, 32\]/);
    await expectCode(mae.forward(randomTensor([1, 3, 64, 64])), 'E_SHAPE', /\[1, 3, 64, 64\]/);
    await expectCode(mae.lossAndGradients(randomTensor([1, 3, 16, 16])), 'E_SHAPE', /images must have shape/);
  });

  it('rejects malformed tensors', async () => {
    await expectCode(mae.forward({ data: new Float32Array(5), shape: [2, 3, 32, 32] }), 'E_SHAPE', /5 values/);
    await expectCode(mae.forward({ data: [1, 2] as unknown as Float32Array, shape: [2] }), 'E_SHAPE', /Float32Array/);
    await expectCode(mae.forward({ data: new Float32Array(2), shape: [2, -1] }), 'E_SHAPE', /invalid shape/);
  });

  it('rejects noise of the wrong shape or with non-random masking', async () => {
    await expectCode(mae.forward(images, { noise: randomTensor([2, 63]) }), 'E_NOISE', /\[2, 64\].*\[2, 63\]/);
    await expectCode(mae.forward(images, { noise: randomTensor([1, 64]) }), 'E_NOISE', /\[2, 64\]/);
    await expectCode(mae.forward(images, { noise: { data: new Float32Array(128).fill(NaN), shape: [2, 64] } }), 'E_NOISE', /finite/);
    await expectCode(mae.forward(images, { noise: randomTensor([2, 64]), masking: 'block' }), 'E_NOISE', /random masking/);
  });

  it('rejects mask ratios outside [0, 1)', async () => {
    for (const maskRatio of [1, 1.5, -0.1, Number.NaN]) {
      await expectCode(mae.forward(images, { maskRatio }), 'E_MASK_RATIO', /maskRatio/);
    }
    await expectCode(mae.forward(images, { maskRatio: 0.5, masking: 'grid' }), 'E_MASK_RATIO', /grid.*0\.75/);
  });

  it('rejects unknown masking, seeds and devices', async () => {
    await expectCode(mae.forward(images, { masking: 'stripes' as never }), 'E_ARGUMENT', /masking/);
    await expectCode(() => MaskedAutoencoder.create({ preset: 'mae_vit_tiny_patch16', seed: -1 }), 'E_ARGUMENT', /seed/);
    await expectCode(() => MaskedAutoencoder.create({ preset: 'mae_vit_tiny_patch16', device: 'tpu' as never }), 'E_ARGUMENT', /device 'tpu'/);
  });

  it('rejects unknown precisions and a non-boolean TF32 switch', async () => {
    await expectCode(() => MaskedAutoencoder.create({ preset: 'mae_vit_tiny_patch16', precision: 'fp16' as never }), 'E_ARGUMENT', /precision must be 'f32' or 'bf16', got "fp16"/);
    await expectCode(MaskedAutoencoder.load(fixture('mae-tiny.weights.safetensors'), { precision: 'tf32' as never }), 'E_ARGUMENT', /precision/);
    await expectCode(() => setAllowTf32('yes' as never), 'E_ARGUMENT', /boolean/);
  });
});

describe('configs', () => {
  it('rejects unknown presets and fields, incomplete and inconsistent configs', async () => {
    await expectCode(() => MaskedAutoencoder.create({ preset: 'mae_vit_giant' as never }), 'E_CONFIG', /unknown preset 'mae_vit_giant'/);
    await expectCode(() => MaskedAutoencoder.create({ preset: 'mae_vit_tiny_patch16', config: { depht: 3 } as never }), 'E_CONFIG', /depht/);
    await expectCode(() => MaskedAutoencoder.create({ config: { imgSize: 32 } }), 'E_CONFIG', /missing.*patchSize/);
    await expectCode(() => MaskedAutoencoder.create({ preset: 'mae_vit_tiny_patch16', config: { numHeads: 5 } }), 'E_CONFIG', /not divisible by numHeads 5/);
    await expectCode(() => MaskedAutoencoder.create({ preset: 'mae_vit_tiny_patch16', config: { patchSize: 15 } }), 'E_CONFIG', /multiple of patchSize/);
    await expectCode(() => MaskedAutoencoder.create({}), 'E_CONFIG', /preset, a config/);
  });
});

describe('checkpoints', () => {
  it('rejects a missing path, file or Hugging Face folder part', async () => {
    await expectCode(MaskedAutoencoder.load(join(dir, 'nope.safetensors')), 'E_CHECKPOINT_NOT_FOUND', /nope\.safetensors/);
    const hf = join(dir, 'hf-no-config');
    mkdirSync(hf);
    copyFileSync(fixture('mae-tiny.hf/model.safetensors'), join(hf, 'model.safetensors'));
    await expectCode(MaskedAutoencoder.load(hf), 'E_CHECKPOINT_NOT_FOUND', /config\.json/);
  });

  it('rejects corrupt and truncated files of each format', async () => {
    for (const name of ['mae-tiny.weights.safetensors', 'mae-tiny.pth', 'mae-tiny.hf/model.safetensors']) {
      const bytes = readFileSync(fixture(name));
      const truncated = join(dir, `truncated-${name.replace('/', '-')}`);
      writeFileSync(truncated, bytes.subarray(0, bytes.length >> 1));
      if (name.startsWith('mae-tiny.hf')) {
        const folder = join(dir, 'hf-truncated');
        mkdirSync(folder);
        copyFileSync(truncated, join(folder, 'model.safetensors'));
        copyFileSync(fixture('mae-tiny.hf/config.json'), join(folder, 'config.json'));
        await expectCode(MaskedAutoencoder.load(folder), 'E_CHECKPOINT_CORRUPT', /model\.safetensors/);
      } else {
        await expectCode(MaskedAutoencoder.load(truncated), 'E_CHECKPOINT_CORRUPT', /not a readable checkpoint/);
      }
    }
    const garbage = join(dir, 'garbage.pth');
    writeFileSync(garbage, Buffer.from('PK\u0003\u0004 this is not really a zip file at all'));
    await expectCode(MaskedAutoencoder.load(garbage), 'E_CHECKPOINT_CORRUPT', /garbage\.pth/);
    const text = join(dir, 'notes.safetensors');
    writeFileSync(text, 'hello');
    await expectCode(MaskedAutoencoder.load(text), 'E_CHECKPOINT_CORRUPT', /notes\.safetensors/);
  });

  it('lists unknown and missing keys', async () => {
    const extra = writeCheckpoint('extra.safetensors', { ...tiny.tensors, 'head.weight': randomTensor([10, 48]) });
    await expectCode(MaskedAutoencoder.load(extra), 'E_CHECKPOINT_KEYS', /head\.weight/);
    const { 'blocks.1.norm2.bias': _dropped, 'decoder_pred.bias': _alsoDropped, ...rest } = tiny.tensors;
    const missing = writeCheckpoint('missing.safetensors', rest);
    await expectCode(MaskedAutoencoder.load(missing), 'E_CHECKPOINT_KEYS', /blocks\.1\.norm2\.bias.*decoder_pred\.bias/);
  });

  it('checks the checkpoint against an explicit config', async () => {
    const path = fixture('mae-tiny.weights.safetensors');
    await expectCode(MaskedAutoencoder.load(path, { config: { embedDim: 96, numHeads: 3 } }), 'E_CHECKPOINT_SHAPE', /cls_token: checkpoint \[1, 1, 48\], config \[1, 1, 96\]/);
    await expectCode(MaskedAutoencoder.load(path, { config: { depth: 3 } }), 'E_CHECKPOINT_KEYS', /blocks\.2\./);
    const config: Partial<MaeConfig> = { numHeads: 3, decoderNumHeads: 4 };
    await expectCode(MaskedAutoencoder.load(fixture('mae-tiny.pth')), 'E_CONFIG', /numHeads.*pass the config/);
    expect((await MaskedAutoencoder.load(fixture('mae-tiny.pth'), { config })).config.numHeads).toBe(3);
  });

  it('rejects an unwritable save path', async () => {
    await expectCode(mae.save(join(dir, 'no-such-folder', 'model.safetensors')), 'E_IO', /no-such-folder/);
  });
});

describe('non-finite inputs', () => {
  /** `images` with NaN, +Inf and -Inf from `[n, c, y, x]` on. */
  function poisoned(shape: number[], at: number[]): { tensor: Tensor; flat: number } {
    const tensor = randomTensor(shape);
    const flat = at.reduce((index, i, d) => index * shape[d] + i, 0);
    tensor.data.set([Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY], flat);
    return { tensor, flat };
  }

  it('every model call rejects NaN or infinite pixels with E_INPUT and the first one\'s index', async () => {
    const { tensor, flat } = poisoned([2, 3, 32, 32], [1, 2, 3, 4]);
    const message = new RegExp(`images must be finite, but value ${flat} \\(at \\[1, 2, 3, 4\\]\\) is NaN`);
    await expectCode(mae.forward(tensor), 'E_INPUT', message);
    await expectCode(mae.lossAndGradients(tensor), 'E_INPUT', message);
    await expectCode(mae.embed(tensor), 'E_INPUT', message);
    await expectCode(mae.reconstruct(tensor), 'E_INPUT', message);
    const clf = await VitClassifier.fromPretrained(mae, { numClasses: 3 });
    await expectCode(clf.forward(tensor), 'E_INPUT', message);
    await expectCode(clf.predict(tensor), 'E_INPUT', message);
    await expectCode(clf.embed(tensor), 'E_INPUT', message);
    await expectCode(clf.lossAndGradients(tensor, [0, 1]), 'E_INPUT', message);
    const infinite = poisoned([1, 3, 32, 32], [0, 0, 0, 0]).tensor;
    infinite.data[0] = Number.NEGATIVE_INFINITY;
    await expectCode(mae.forward(infinite), 'E_INPUT', /value 0 \(at \[0, 0, 0, 0\]\) is -inf/);
  });
});

describe('oversized configs and arguments', () => {
  // Each of these used to abort the process (an allocation failure is not an error in
  // Rust). The sizes pass the 47-bit address space, so no machine holds them.
  it('create refuses sizes out of range with E_CONFIG and models too large for memory with E_OUT_OF_MEMORY', async () => {
    const create = (config: Partial<MaeConfig>) => () => MaskedAutoencoder.create({ preset: 'mae_vit_tiny_patch16', config });
    await expectCode(create({ embedDim: 1e6, numHeads: 8 }), 'E_OUT_OF_MEMORY', /the model needs 576 TB for its parameters, more than the .* this process can allocate/);
    await expectCode(create({ imgSize: 1e6 }), 'E_OUT_OF_MEMORY', /the model needs .* TB/);
    await expectCode(create({ depth: 1e6 }), 'E_CONFIG', /depth must be an integer from 1 to 1024, got 1000000/);
    await expectCode(create({ decoderEmbedDim: 2 ** 33, decoderNumHeads: 4 }), 'E_CONFIG', /decoderEmbedDim/);
    await expectCode(create({ patchSize: 1, inChans: 1, normPixLoss: true, imgSize: 8 }), 'E_CONFIG', /normPixLoss needs patches of at least two values/);
  });

  it('classifiers too large for memory are E_OUT_OF_MEMORY', async () => {
    const config = { imgSize: 32, patchSize: 4, inChans: 3, embedDim: 100_000, depth: 1, numHeads: 4, mlpRatio: 4, layerNormEps: 1e-6, numClasses: 1e9, globalPool: true, headBatchNorm: false };
    await expectCode(() => VitClassifier.create(config), 'E_OUT_OF_MEMORY', /the classifier needs 400 TB for its parameters/);
    // A million-pixel side: one image's attention scores alone pass the address space.
    await expectCode(VitClassifier.fromPretrained(mae, { numClasses: 10, imgSize: 1e6 }), 'E_OUT_OF_MEMORY', /the classifier needs/);
  });

  it('a checkpoint whose config contradicts its tensors is refused before the model is built', async () => {
    const wide = join(dir, 'wide-config.safetensors');
    const config = JSON.parse(tiny.metadata.config);
    writeFileSync(wide, writeSafetensors(tiny.tensors, { ...tiny.metadata, config: JSON.stringify({ ...config, embed_dim: 3e6 }) }));
    await expectCode(MaskedAutoencoder.load(wide), 'E_CHECKPOINT_SHAPE', /cls_token: checkpoint \[1, 1, 48\], config \[1, 1, 3000000\]/);
    const hf = join(dir, 'hf-wide');
    mkdirSync(hf);
    copyFileSync(fixture('mae-tiny.hf/model.safetensors'), join(hf, 'model.safetensors'));
    const hfConfig = JSON.parse(readFileSync(fixture('mae-tiny.hf/config.json'), 'utf8'));
    writeFileSync(join(hf, 'config.json'), JSON.stringify({ ...hfConfig, hidden_size: 3e6, intermediate_size: 12e6 }));
    await expectCode(MaskedAutoencoder.load(hf), 'E_CHECKPOINT_SHAPE', /cls_token/);
  });

  it('loadImages takes integer sizes and counts (E_ARGUMENT) and refuses what cannot fit in memory', async () => {
    const data = { kind: 'idx' as const, path: resolve(root, 'data/fashion-mnist/t10k-images-idx3-ubyte.gz') };
    const load = (options: { imgSize: number; inChans?: number; count?: number; start?: number }) => loadImages(data, { inChans: 1, count: 4, ...options });
    await expectCode(load({ imgSize: -1 }), 'E_ARGUMENT', /imgSize must be an integer from 1 to 4294967295, got -1/);
    await expectCode(load({ imgSize: 1.5 }), 'E_ARGUMENT', /imgSize .* got 1\.5/);
    await expectCode(load({ imgSize: 0 }), 'E_ARGUMENT', /imgSize/);
    await expectCode(load({ imgSize: 16, count: 0 }), 'E_ARGUMENT', /count must be an integer from 1/);
    await expectCode(load({ imgSize: 16, start: -4 }), 'E_ARGUMENT', /start must be an integer from 0/);
    await expectCode(load({ imgSize: 16, inChans: Number.NaN }), 'E_ARGUMENT', /inChans/);
    await expectCode(load({ imgSize: 16, start: 2 }), 'E_ARGUMENT', /start must be a multiple of count/);
    await expectCode(load({ imgSize: 1e5, count: 1e5 }), 'E_OUT_OF_MEMORY', /the data loader needs .* for 2 batches of 100000 images of 1x100000x100000/);
    expect((await load({ imgSize: 16 })).shape).toEqual([4, 1, 16, 16]);
  });

  it('writeReconstructionGrid and encodeReconstructionGrid name the argument that is not a [N, C, H, W] tensor', async () => {
    const png = join(dir, 'grid.png');
    const t = randomTensor([1, 1, 8, 8]);
    const reconstruction = { loss: 0, mask: randomTensor([1, 4]), masked: t, reconstruction: t, pasted: t };
    await expectCode(writeReconstructionGrid(png, {} as never, t), 'E_SHAPE', /reconstruction\.masked must be a tensor/);
    await expectCode(writeReconstructionGrid(png, null as never, t), 'E_ARGUMENT', /reconstruction must be/);
    await expectCode(writeReconstructionGrid(png, { ...reconstruction, pasted: randomTensor([1, 8, 8]) }, t), 'E_SHAPE', /reconstruction\.pasted must be \[N, C, H, W\], got \[1, 8, 8\]/);
    await expectCode(writeReconstructionGrid(png, reconstruction, randomTensor([3, 1, 8])), 'E_SHAPE', /originals must be \[N, C, H, W\]/);
    await expectCode(writeReconstructionGrid(png, reconstruction, randomTensor([1, 1, 4, 4])), 'E_SHAPE', /one shape/);
    await expectCode(encodeReconstructionGrid(reconstruction, randomTensor([1, 1, 4, 4])), 'E_SHAPE', /one shape/);
  });
});

describe('the error boundary', () => {
  it('the addon gives the code as the error\'s code and the message without it', async () => {
    // Each call is made when its case is awaited: a promise made earlier could reject
    // before anything awaits it, which Node reports as an unhandled rejection.
    const cases: [() => unknown, ErrorCode][] = [
      [() => mae.forward(randomTensor([1, 1, 32, 32])), 'E_SHAPE'],
      [() => MaskedAutoencoder.create({ preset: 'mae_vit_tiny_patch16', config: { numHeads: 5 } }), 'E_CONFIG'],
      [() => MaskedAutoencoder.load(join(dir, 'absent.safetensors')), 'E_CHECKPOINT_NOT_FOUND'],
      [() => mae.save(join(dir, 'absent', 'm.safetensors')), 'E_IO'],
    ];
    for (const [call, code] of cases) {
      const error = await rejection(call);
      expect(error.code).toBe(code);
      expect(error.message).not.toMatch(/^E_[A-Z_]+: /);
      // What the addon threw, unchanged: the code travels as a field, not in the text.
      const native = error.cause as Error & { code?: unknown };
      expect(native).toBeInstanceOf(Error);
      expect(native.code).toBe(code);
      expect(native.message).toBe(error.message);
    }
  });

  it('ERROR_CODES, exported, lists every code once, the facade\'s own included', () => {
    expect(new Set(ERROR_CODES).size).toBe(ERROR_CODES.length);
    expect(ERROR_CODES).toEqual(expect.arrayContaining(['E_SHAPE', 'E_INPUT', 'E_OUT_OF_MEMORY', 'E_NATIVE_LOAD', 'E_INTERNAL']));
  });

  it('an error without a known code is E_INTERNAL with the original as its cause', () => {
    const unknown = Object.assign(new Error('E_SHAPE: looks coded but is not'), { code: 'E_NO_SUCH_CODE' });
    const error = (() => {
      try {
        rethrow(unknown);
      } catch (e) {
        return e as VitMaeError;
      }
    })();
    expect(error).toBeInstanceOf(VitMaeError);
    expect(error.code).toBe('E_INTERNAL');
    expect(error.cause).toBe(unknown);
    // napi-rs's own argument errors carry napi statuses, not vit-mae codes.
    expect(() => binding.NativeMae.create(undefined, undefined, 'seven' as never, 'cpu', 'f32')).toThrow(expect.objectContaining({ code: 'NumberExpected' }));
  });

  it('messages stay one statement when RUST_BACKTRACE is set', () => {
    // candle appends a backtrace to its errors under RUST_BACKTRACE, and a corrupt
    // file's message quotes the reader's error: here, a pickle with an unknown opcode.
    const pth = join(dir, 'bad-pickle.pth');
    writeFileSync(pth, zip([['archive/data.pkl', Buffer.from([0x80, 0x02, 0xff]), 0]]));
    const script = `import { MaskedAutoencoder } from ${JSON.stringify(pathToFileURL(resolve(root, 'dist/index.js')).href)};
      try { await MaskedAutoencoder.load(${JSON.stringify(pth)}); } catch (e) { process.stdout.write(JSON.stringify({ code: e.code, message: e.message })); }`;
    const env = { ...process.env, RUST_BACKTRACE: '1' };
    delete env.RUST_LIB_BACKTRACE;
    const child = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', env });
    expect(child.status, child.stderr).toBe(0);
    const { code, message } = JSON.parse(child.stdout) as { code: string; message: string };
    expect(code).toBe('E_CHECKPOINT_CORRUPT');
    expect(message).toMatch(/bad-pickle\.pth is not a readable checkpoint: its pickle \(archive\/data\.pkl\), at byte 2: opcode 0xff is not one torch\.save writes$/);
    expect(message).not.toMatch(/\n|candle_core::|backtrace/);
  });
});

describe('after all those errors', () => {
  it('the model still works', async () => {
    const out = await mae.forward(images);
    expect(Number.isFinite(out.loss)).toBe(true);
  });
});
