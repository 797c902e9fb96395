// Parity with the PyTorch reference fixtures (the repository's own in test/fixtures,
// and ../shared/fixtures' when present): every MAE case in each of the three checkpoint
// formats it comes in, outputs within 1e-4 and every gradient within 1e-3 of its tensor's largest
// magnitude.
import { existsSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { MaskedAutoencoder, type MaeConfig } from '../ts/index.js';
import { FIXTURE_DIRS, fixture, readSafetensors, worstMismatch } from './helpers.js';

const CASES = FIXTURE_DIRS.flatMap((dir) =>
  ['mae-tiny', 'mae-tiny-normpix', 'mae-1ch-p7', 'mae-1ch-p7-normpix', 'mae-tiny-pca'].filter((name) => existsSync(fixture(`${name}.case.safetensors`, dir))).map((name) => ({ name, dir })),
);
const FORMATS = [
  { name: 'safetensors', path: (c: string) => `${c}.weights.safetensors` },
  { name: 'pth', path: (c: string) => `${c}.pth` },
  { name: 'huggingface', path: (c: string) => `${c}.hf` },
] as const;

const output = (want: number) => Math.max(1e-4, 1e-4 * Math.abs(want));

describe.each(CASES)('$name in $dir', ({ name: caseName, dir }) => {
  const reference = readSafetensors(fixture(`${caseName}.case.safetensors`, dir));
  // The fixture's config in the published (snake_case) spelling, plus its mask ratio.
  const { mask_ratio: maskRatio, ...published } = JSON.parse(reference.metadata.config) as { mask_ratio: number } & Record<string, unknown>;
  const { imgs, noise } = reference.tensors;

  // Every format the case comes in (a PCA target has no Hugging Face counterpart).
  describe.each(FORMATS.filter((format) => existsSync(fixture(format.path(caseName), dir))))('loaded from $name', (format) => {
    // A .pth holds only the state dict: its shapes do not tell these tiny models'
    // head counts, so that format gets the config explicitly.
    const load = () =>
      MaskedAutoencoder.load(fixture(format.path(caseName), dir), {
        config: format.name === 'pth' ? (published as unknown as Partial<MaeConfig>) : undefined,
      });

    it('forward matches loss, pred, mask and latent', async () => {
      const mae = await load();
      expect(mae.checkpointFormat).toBe(format.name);
      expect(mae.freshDecoder).toBe(false);
      const out = await mae.forward(imgs, { maskRatio, noise });
      expect(Math.abs(out.loss - reference.tensors.loss.data[0])).toBeLessThanOrEqual(output(reference.tensors.loss.data[0]));
      for (const key of ['pred', 'mask', 'latent'] as const) {
        expect(out[key].shape, key).toEqual(reference.tensors[key].shape);
        expect(worstMismatch(out[key].data, reference.tensors[key].data, output), key).toBeNull();
      }
    });

    it('gives every trainable parameter its reference gradient', async () => {
      const mae = await load();
      const { loss, gradients } = await mae.lossAndGradients(imgs, { maskRatio, noise });
      expect(Math.abs(loss - reference.tensors.loss.data[0])).toBeLessThanOrEqual(output(reference.tensors.loss.data[0]));

      const trainable = Object.keys(mae.parameterShapes());
      const expected = Object.keys(reference.tensors).filter((k) => k.startsWith('grad.')).map((k) => k.slice(5));
      expect(trainable.sort()).toEqual(expected.sort());
      expect(Object.keys(gradients).sort(), 'a trainable parameter received no gradient').toEqual(trainable.sort());

      for (const name of trainable) {
        const want = reference.tensors[`grad.${name}`];
        const scale = want.data.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
        expect(scale, `${name}: reference gradient is zero`).toBeGreaterThan(0);
        expect(gradients[name].shape, name).toEqual(want.shape);
        expect(worstMismatch(gradients[name].data, want.data, () => 1e-3 * scale), name).toBeNull();
      }
    });
  });
});
