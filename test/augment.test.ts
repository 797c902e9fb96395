// The augmentation options of the facade (the paper's Table 1e and the fine-tuning
// recipe): what each selects, determinism, and the errors for bad values. The
// operations' numbers are checked by the Rust unit tests; here, that the options arrive.
import { describe, expect, it } from 'vitest';
import { MaskedAutoencoder, PUBLISHED_CROP_FRACTION, loadImages, type AugmentOptions, type MaeConfig, type Tensor } from '../ts/index.js';

const SIDE = 8;
/** One 8x8 gray image whose pixel (y, x) is (8y + x) / 64. */
const ramp: Tensor = { data: Float32Array.from({ length: SIDE * SIDE }, (_, i) => i / 64), shape: [1, 1, SIDE, SIDE] };
const source = { kind: 'memory' as const, images: ramp };
/** No normalisation, so pixels come back as they are. */
const RAW = { mean: [0], std: [1] };

const load = (augment: AugmentOptions, imgSize = 4) => loadImages(source, { imgSize, inChans: 1, count: 1, augment: { ...RAW, ...augment } });

describe('augmentation options', () => {
  it('cropFraction takes the central part of the shorter side', async () => {
    const out = await load({ cropFraction: 0.5 });
    const central = [2, 3, 4, 5].flatMap((y) => [2, 3, 4, 5].map((x) => (8 * y + x) / 64));
    expect(Array.from(out.data)).toEqual(central.map(Math.fround));
    expect(PUBLISHED_CROP_FRACTION).toBe(0.875);
  });

  it("crop 'fixed' takes a window of the fraction, the same one for the same seed and item", async () => {
    const out = await load({ crop: 'fixed', cropFraction: 0.5 });
    const first = Math.round(out.data[0] * 64);
    const [top, left] = [Math.floor(first / 8), first % 8];
    const window = [0, 1, 2, 3].flatMap((y) => [0, 1, 2, 3].map((x) => (8 * (top + y) + left + x) / 64));
    expect(Array.from(out.data)).toEqual(window.map(Math.fround));
    expect(await load({ crop: 'fixed', cropFraction: 0.5 })).toEqual(out);
  });

  it('every training setting runs and is deterministic', async () => {
    const settings: AugmentOptions[] = [
      { crop: 'center', hflip: false },
      { crop: 'fixed' },
      { crop: 'randomResized' },
      { crop: 'randomResized', colorJitter: 0.4 },
      { colorJitter: [0.4, 0.2, 0], randAugment: 'rand-m9-mstd0.5-inc1', randomErasing: 0.25 },
      { randomResizedCrop: false },
    ];
    for (const augment of settings) {
      const out = await load(augment, SIDE);
      expect(out.shape, JSON.stringify(augment)).toEqual([1, 1, SIDE, SIDE]);
      expect(await load(augment, SIDE)).toEqual(out);
    }
  });

  it('refuses bad values with E_ARGUMENT and a message naming the option', async () => {
    const refused = async (augment: Record<string, unknown>, message: RegExp) => {
      await expect(load(augment as AugmentOptions)).rejects.toMatchObject({ code: 'E_ARGUMENT', message: expect.stringMatching(message) });
    };
    await refused({ crop: 'random' }, /unknown crop 'random': expected center, fixed, randomResized/);
    await refused({ crop: 'fixed', randomResizedCrop: true }, /contradicts randomResizedCrop/);
    await refused({ cropFraction: 0 }, /cropFraction must be in \(0, 1\]/);
    await refused({ cropFraction: 1.5 }, /cropFraction/);
    await refused({ cropFraction: 'half' }, /cropFraction must be a number, got string/);
    await refused({ colorJitter: -1 }, /colorJitter must be/);
    await refused({ colorJitter: [0.4, 0.4] }, /colorJitter must be/);
    await refused({ randAugment: 'm9' }, /must start with 'rand'/);
    await refused({ randAugment: 'rand-m9-w0' }, /bad section 'w0'/);
    await refused({ randAugment: 9 }, /randAugment must be a string/);
    await refused({ randomErasing: 1.5 }, /randomErasing must be a probability/);
    await refused({ randomErasing: '0.25' }, /randomErasing must be a number/);
  });

  it('pre-training takes the whole fine-tuning recipe of augmentations', async () => {
    const config: MaeConfig = {
      imgSize: 8, patchSize: 4, inChans: 1, embedDim: 8, depth: 1, numHeads: 1,
      decoderEmbedDim: 8, decoderDepth: 1, decoderNumHeads: 1, mlpRatio: 2, normPixLoss: false, layerNormEps: 1e-6,
    };
    const mae = MaskedAutoencoder.create({ config, seed: 0 });
    const images: Tensor = { data: new Float32Array(4 * 64).map((_, i) => (i % 13) / 13), shape: [4, 1, 8, 8] };
    const augment: AugmentOptions = { crop: 'fixed', colorJitter: 0.4, randAugment: 'rand-m9-mstd0.5-inc1', randomErasing: 0.25 };
    const summary = await mae.pretrain({ data: { kind: 'memory', images }, augment, batchSize: 2, epochs: 1, warmupEpochs: 0, workers: 1 }).result;
    expect(summary.steps).toBe(2);
    expect(Number.isFinite(summary.finalLoss)).toBe(true);
    mae.dispose();
  });
});
