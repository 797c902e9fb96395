// Dense features (featureMaps) of both models: shapes and options, the maps against
// embed and against each other, the simple feature pyramid, other image sizes, errors.
import { describe, expect, it } from 'vitest';
import { MaskedAutoencoder, VitClassifier, type Tensor } from '../ts/index.js';
// TINY: 16x16 images, 4x4 patches (a 4x4 grid), 2 blocks of width 16.
import { TINY, randomTensor } from './helpers.js';

const D = TINY.embedDim;

function expectClose(got: Tensor, want: Tensor, tolerance: number): void {
  expect(got.shape).toEqual(want.shape);
  const worst = got.data.reduce((m, v, i) => Math.max(m, Math.abs(v - want.data[i])), 0);
  expect(worst).toBeLessThan(tolerance);
}

/** The value of map `[N, D, h, w]` at (n, c, i, j). */
const at = (t: Tensor, n: number, c: number, i: number, j: number) => t.data[((n * t.shape[1] + c) * t.shape[2] + i) * t.shape[3] + j];

describe('featureMaps', () => {
  const mae = MaskedAutoencoder.create({ config: TINY, seed: 3 });
  const images = randomTensor([2, 3, 16, 16], 5);

  it('gives the last block by default, as [N, D, H/p, W/p]; the pyramid only when asked', async () => {
    const { maps, pyramid } = await mae.featureMaps(images);
    expect(maps).toHaveLength(1);
    expect(maps[0].shape).toEqual([2, D, 4, 4]);
    expect(pyramid).toBeNull();
    const [last] = (await mae.featureMaps(images, { layers: [-1] })).maps;
    expect(last.data).toEqual(maps[0].data);
  });

  it('is the patch tokens of the last block: normalised and averaged, they are embed', async () => {
    // A fresh model's final norm is the plain LayerNorm; embed averages it over the patches.
    const [[map], embedded] = await Promise.all([mae.featureMaps(images).then((f) => f.maps), mae.embed(images)]);
    const mean = new Float64Array(2 * D);
    for (let n = 0; n < 2; n++) {
      for (let p = 0; p < 16; p++) {
        const token = Array.from({ length: D }, (_, c) => at(map, n, c, Math.floor(p / 4), p % 4));
        const mu = token.reduce((a, b) => a + b, 0) / D;
        const sd = Math.sqrt(token.reduce((a, b) => a + (b - mu) ** 2, 0) / D + 1e-6);
        token.forEach((v, c) => (mean[n * D + c] += (v - mu) / sd / 16));
      }
    }
    expectClose(embedded, { data: Float32Array.from(mean), shape: [2, D] }, 1e-4);
  });

  it('takes the blocks in the order asked, from the start or the end', async () => {
    const { maps } = await mae.featureMaps(images, { layers: [1, 0, -2] });
    expect(maps).toHaveLength(3);
    expect(maps[2].data).toEqual(maps[1].data);
    expect(maps[0].data).not.toEqual(maps[1].data);
  });

  it('resamples the last map into the simple feature pyramid: 4x, 2x, 1x (nearest) and a 2x2 max-pool', async () => {
    const { maps, pyramid } = await mae.featureMaps(images, { layers: [0, 1], pyramid: true });
    const map = maps[1];
    expect(pyramid!.map((t) => t.shape)).toEqual([
      [2, D, 16, 16],
      [2, D, 8, 8],
      [2, D, 4, 4],
      [2, D, 2, 2],
    ]);
    const [x4, x2, x1, half] = pyramid!;
    expect(x1.data).toEqual(map.data);
    for (const [n, c, i, j] of [[0, 0, 0, 0], [1, 5, 3, 2], [1, 15, 2, 3]]) {
      expect(at(x4, n, c, 4 * i + 3, 4 * j + 1)).toBe(at(map, n, c, i, j));
      expect(at(x2, n, c, 2 * i + 1, 2 * j)).toBe(at(map, n, c, i, j));
    }
    const pooled = Math.max(at(map, 1, 7, 2, 0), at(map, 1, 7, 2, 1), at(map, 1, 7, 3, 0), at(map, 1, 7, 3, 1));
    expect(at(half, 1, 7, 1, 0)).toBe(pooled);
  });

  it('takes other image sizes whose sides are multiples of the patch size', async () => {
    const { maps, pyramid } = await mae.featureMaps(randomTensor([1, 3, 24, 40], 6), { pyramid: true });
    expect(maps[0].shape).toEqual([1, D, 6, 10]);
    expect(pyramid![3].shape).toEqual([1, D, 3, 5]);
  });

  it("gives a classifier's encoder the same maps, at its size and at others", async () => {
    const clf = await VitClassifier.fromPretrained(mae, { numClasses: 3 });
    const other = randomTensor([1, 3, 8, 12], 7);
    const [a, b, c, d] = await Promise.all([clf.featureMaps(images, { layers: [0, 1] }), mae.featureMaps(images, { layers: [0, 1] }), clf.featureMaps(other), mae.featureMaps(other)]);
    a.maps.forEach((map, i) => expectClose(map, b.maps[i], 1e-5));
    expectClose(c.maps[0], d.maps[0], 1e-5);
    expect(c.maps[0].shape).toEqual([1, D, 2, 3]);
  });

  it('refuses bad layers and options with E_ARGUMENT, bad images with E_SHAPE', async () => {
    const code = (p: Promise<unknown>) => p.then(() => 'resolved', (e: { code: string; message: string }) => `${e.code}: ${e.message}`);
    expect(await code(mae.featureMaps(images, { layers: [2] }))).toMatch(/^E_ARGUMENT: layer 2 is not a block of this 2-block encoder/);
    expect(await code(mae.featureMaps(images, { layers: [-3] }))).toMatch(/^E_ARGUMENT/);
    expect(await code(mae.featureMaps(images, { layers: [] }))).toMatch(/^E_ARGUMENT: layers must be a non-empty array/);
    expect(await code(mae.featureMaps(images, { layers: [0.5] }))).toMatch(/^E_ARGUMENT/);
    expect(await code(mae.featureMaps(images, { pyramid: 'yes' as unknown as boolean }))).toMatch(/^E_ARGUMENT: pyramid must be a boolean/);
    expect(await code(mae.featureMaps(randomTensor([1, 3, 18, 16])))).toMatch(/^E_SHAPE: .*multiples of the patch size 4/);
    expect(await code(mae.featureMaps(randomTensor([1, 1, 16, 16])))).toMatch(/^E_SHAPE/);
    expect(await code(mae.featureMaps({ data: new Float32Array(3), shape: [1, 3, 16, 16] }))).toMatch(/^E_SHAPE/);
    // The stride-32 level needs at least 2x2 patches.
    expect(await code(mae.featureMaps(randomTensor([1, 3, 4, 16]), { pyramid: true }))).toMatch(/^E_SHAPE: the feature pyramid/);
  });

  it('is refused while the model trains (E_BUSY) and after dispose (E_DISPOSED)', async () => {
    const model = MaskedAutoencoder.create({ config: TINY, seed: 1 });
    const data = randomTensor([8, 3, 16, 16], 4);
    data.data.forEach((v, i) => (data.data[i] = 0.5 + 0.1 * v)); // pixels in [0, 1]
    const run = model.pretrain({ data: { kind: 'memory', images: data }, batchSize: 4, epochs: 1, warmupEpochs: 0, workers: 1, augment: { randomResizedCrop: false, hflip: false } });
    await expect(model.featureMaps(images)).rejects.toEqual(expect.objectContaining({ code: 'E_BUSY' }));
    await run.result;
    model.dispose();
    await expect(model.featureMaps(images)).rejects.toEqual(expect.objectContaining({ code: 'E_DISPOSED' }));
  });
});
