// Images as users hold them (paths, encoded bytes, raw pixels) become exactly the model
// input the dataset loader makes of the same file in evaluation mode, in every API that
// takes a batch; bad items get coded errors that name them.
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  FASHION_MNIST_MEAN,
  FASHION_MNIST_STD,
  IMAGENET_MEAN,
  IMAGENET_STD,
  MaskedAutoencoder,
  PUBLISHED_CROP_FRACTION,
  VitClassifier,
  VitMaeError,
  encodeReconstructionGrid,
  loadImages,
  preprocess,
  type ImageInput,
  type Tensor,
} from '../ts/index.js';
import { TINY, encodePngPixels } from './helpers.js';

const IMAGES = resolve(import.meta.dirname, 'fixtures/images');
const work = mkdtempSync(join(tmpdir(), 'vit-mae-images-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** The pattern test/fixtures/images/generate.py draws, as interleaved 8-bit pixels. */
function pattern(width: number, height: number, channels: 1 | 3 | 4): Uint8Array {
  const data = new Uint8Array(width * height * channels);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const r = Math.floor((x * 255) / (width - 1));
      const g = Math.floor((y * 255) / (height - 1));
      const inside = Math.floor(width / 3) <= x && x < Math.floor((2 * width) / 3) && Math.floor(height / 3) <= y && y < Math.floor((2 * height) / 3);
      const b = inside ? 230 : 40;
      const pixel = channels === 1 ? [Math.floor((r + g + b) / 3)] : channels === 3 ? [r, g, b] : [r, g, b, (x * 7 + y) % 256];
      data.set(pixel, (y * width + x) * channels);
    }
  }
  return data;
}

let folders = 0;
/** What the dataset loader gives for `file` in evaluation mode (a folder holding it alone). */
async function loaderView(file: string, imgSize: number, inChans: number, augment: { cropFraction?: number; padTo?: number } = {}): Promise<Tensor> {
  const dir = join(work, `folder-${folders++}`);
  mkdirSync(dir);
  copyFileSync(file, join(dir, 'image' + file.slice(file.lastIndexOf('.'))));
  return loadImages({ kind: 'folder', path: dir }, { imgSize, inChans, count: 1, augment: { cropFraction: 1, ...augment } });
}

function writeTemp(name: string, bytes: Uint8Array): string {
  const path = join(work, name);
  writeFileSync(path, bytes);
  return path;
}

/** Whether two tensors are equal bit for bit (same shape, same float bits). */
function expectBitEqual(got: Tensor, want: Tensor, what: string): void {
  expect(got.shape, what).toEqual(want.shape);
  expect(Buffer.from(got.data.buffer, got.data.byteOffset, got.data.byteLength).equals(Buffer.from(want.data.buffer, want.data.byteOffset, want.data.byteLength)), what).toBe(true);
}

async function expectCode(promise: Promise<unknown>, code: string, message: RegExp): Promise<void> {
  const error = await promise.then(
    () => null,
    (e: unknown) => e,
  );
  expect(error, `expected ${code}`).toBeInstanceOf(VitMaeError);
  expect((error as VitMaeError).code).toBe(code);
  expect((error as VitMaeError).message).toMatch(message);
}

describe('preprocess: each input kind gives what the loader gives, bit for bit', () => {
  const rgbPng = writeTemp('rgb.png', encodePngPixels(40, 30, 3, pattern(40, 30, 3)));
  const rgbaPng = writeTemp('rgba.png', encodePngPixels(36, 36, 4, pattern(36, 36, 4)));
  const grayPng = writeTemp('gray.png', encodePngPixels(30, 44, 1, pattern(30, 44, 1)));
  const cases: { name: string; file: string; raw?: { width: number; height: number; channels: 1 | 3 | 4 } }[] = [
    { name: 'RGB PNG', file: rgbPng, raw: { width: 40, height: 30, channels: 3 } },
    { name: 'RGBA PNG', file: rgbaPng, raw: { width: 36, height: 36, channels: 4 } },
    { name: 'gray PNG', file: grayPng, raw: { width: 30, height: 44, channels: 1 } },
    { name: 'lossless RGBA WebP', file: join(IMAGES, 'alpha.webp'), raw: { width: 36, height: 36, channels: 4 } },
    { name: 'JPEG', file: join(IMAGES, 'photo.jpg') },
    { name: 'gray JPEG', file: join(IMAGES, 'gray.jpg') },
    { name: 'BMP', file: join(IMAGES, 'tiny.bmp'), raw: { width: 24, height: 20, channels: 3 } },
  ];
  const transforms = [
    { imgSize: 16, inChans: 3, augment: {} },
    { imgSize: 16, inChans: 1, augment: {} },
    { imgSize: 24, inChans: 3, augment: { cropFraction: PUBLISHED_CROP_FRACTION } },
    { imgSize: 20, inChans: 1, augment: { cropFraction: 0.5, padTo: 48 } },
  ];

  for (const c of cases) {
    it(`${c.name}: path, Buffer, Uint8Array${c.raw ? ' and raw pixels' : ''}`, async () => {
      for (const { imgSize, inChans, augment } of transforms) {
        const what = `${c.name} at ${imgSize}x${inChans} ${JSON.stringify(augment)}`;
        const want = await loaderView(c.file, imgSize, inChans, augment);
        const options = { imgSize, inChans, cropFraction: 1, ...augment };
        const bytes = readFileSync(c.file);
        expectBitEqual(await preprocess(c.file, options), want, `${what}: path`);
        expectBitEqual(await preprocess(bytes, options), want, `${what}: Buffer`);
        expectBitEqual(await preprocess(new Uint8Array(bytes), options), want, `${what}: Uint8Array`);
        if (c.raw) {
          const { width, height, channels } = c.raw;
          const data = pattern(width, height, channels);
          expectBitEqual(await preprocess({ data, width, height, channels }, options), want, `${what}: raw pixels`);
          // A canvas ImageData: clamped bytes, no channel count (4 implied by the length).
          if (channels === 4) expectBitEqual(await preprocess({ data: new Uint8ClampedArray(data), width, height }, options), want, `${what}: ImageData`);
        }
      }
    });
  }

  it('defaults: the published center crop (224/256 of the shorter side) and the normalisation by channel count', async () => {
    const want = await loaderView(rgbPng, 16, 3, { cropFraction: PUBLISHED_CROP_FRACTION });
    expectBitEqual(await preprocess(rgbPng, { imgSize: 16, inChans: 3 }), want, 'default transform');
    const other = await preprocess(rgbPng, { imgSize: 16, inChans: 3, cropFraction: 1 });
    expect(other.data).not.toEqual(want.data);
  });

  it("fit 'fill' resizes the whole image, aspect not kept; 'cover' crops its centre (hand-checked)", async () => {
    // 40x20, white in the 5 leftmost columns, black elsewhere; gray.
    const width = 40;
    const height = 20;
    const data = new Uint8Array(width * height).map((_, i) => (i % width < 5 ? 255 : 0));
    const f = Math.fround;
    const black = f(f(0 - f(FASHION_MNIST_MEAN[0])) / f(FASHION_MNIST_STD[0])); // as f32 arithmetic gives it
    const cover = await preprocess({ data, width, height, channels: 1 }, { imgSize: 8, inChans: 1, cropFraction: 1 });
    // The central 20x20 square (columns 10-29): bicubic taps reach 2 source columns past it, all black.
    expect(new Set(cover.data)).toEqual(new Set([black]));
    const fill = await preprocess({ data, width, height, channels: 1 }, { imgSize: 8, inChans: 1, fit: 'fill' });
    // 5 of 40 columns are the first output column's span: white there, black from column 2 on.
    for (let y = 0; y < 8; y++) {
      expect(fill.data[y * 8]).toBeGreaterThan(1);
      for (let x = 2; x < 8; x++) expect(fill.data[y * 8 + x]).toBeCloseTo(black, 5);
    }
    // A square image: fill and a whole-square cover are the same resize.
    const square = { data: pattern(36, 36, 3), width: 36, height: 36, channels: 3 as const };
    expectBitEqual(await preprocess(square, { imgSize: 16, inChans: 3, fit: 'fill' }), await preprocess(square, { imgSize: 16, inChans: 3, cropFraction: 1 }), 'square');
  });

  it('a constant image gives (value - mean) / std in every channel, gray replicated to RGB', async () => {
    const data = new Uint8Array(12 * 12).fill(51); // 0.2
    const t = await preprocess({ data, width: 12, height: 12, channels: 1 }, { imgSize: 8, inChans: 3 });
    expect(t.shape).toEqual([1, 3, 8, 8]);
    for (let c = 0; c < 3; c++) {
      for (let i = 0; i < 64; i++) expect(t.data[c * 64 + i]).toBeCloseTo((0.2 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], 5);
    }
    const own = await preprocess({ data, width: 12, height: 12, channels: 1 }, { imgSize: 8, inChans: 1, mean: [0.5], std: [0.25] });
    expect(own.data[0]).toBeCloseTo((0.2 - 0.5) / 0.25, 5);
  });

  it('a mixed batch is the batch of its items, in order', async () => {
    const options = { imgSize: 16, inChans: 3 };
    const raw = { data: pattern(36, 36, 4), width: 36, height: 36, channels: 4 as const };
    const items: ImageInput[] = [join(IMAGES, 'photo.jpg'), readFileSync(rgbPng), raw, join(IMAGES, 'gray.jpg')];
    const batch = await preprocess(items, options);
    expect(batch.shape).toEqual([4, 3, 16, 16]);
    for (const [i, item] of items.entries()) {
      const one = await preprocess(item, options);
      expectBitEqual({ data: batch.data.subarray(i * 768, (i + 1) * 768), shape: [1, 3, 16, 16] }, one, `item ${i}`);
    }
  });
});

describe('preprocess: bad images are coded errors naming the item', () => {
  const good = join(IMAGES, 'photo.jpg');
  const options = { imgSize: 16, inChans: 3 };

  it('undecodable bytes, a missing file, a file that is no image', async () => {
    await expectCode(preprocess([good, Buffer.from('not an image')], options), 'E_IMAGE', /^image 1: cannot decode image of 12 bytes/);
    const missing = join(work, 'missing.png');
    await expectCode(preprocess([good, good, missing], options), 'E_IO', new RegExp(`^image 2 \\(${missing}\\): cannot read ${missing}`));
    const text = writeTemp('notes.png', Buffer.from('hello'));
    await expectCode(preprocess(text, options), 'E_IMAGE', new RegExp(`^image 0 \\(${text}\\): cannot decode image`));
    // A PNG cut short.
    const png = readFileSync(writeTemp('whole.png', encodePngPixels(8, 8, 3, pattern(8, 8, 3))));
    await expectCode(preprocess(png.subarray(0, 40), options), 'E_IMAGE', /^image 0: cannot decode image of 40 bytes/);
  });

  it('zero sizes, unsupported channel counts, pixels that do not fill their size', async () => {
    await expectCode(preprocess({ data: new Uint8Array(0), width: 0, height: 4, channels: 3 }, options), 'E_IMAGE', /^image 0: raw pixels of size 0x4 have an empty side/);
    await expectCode(preprocess([good, { data: new Uint8Array(32), width: 4, height: 4, channels: 2 as 1 }], options), 'E_IMAGE', /^image 1: raw pixels have 2 channels; 1 \(gray\), 3 \(RGB\) or 4 \(RGBA\)/);
    await expectCode(preprocess({ data: new Uint8Array(47), width: 4, height: 4, channels: 3 }, options), 'E_IMAGE', /^image 0: raw pixels hold 47 bytes but 4x4x3 needs 48/);
    await expectCode(preprocess({ data: new Uint8Array(47), width: 4, height: 4 }, options), 'E_IMAGE', /^image 0: 47 bytes are not a whole number of channels of 4x4 pixels/);
    await expectCode(preprocess({ data: new Uint8Array(48), width: 4.5, height: 4 }, options), 'E_IMAGE', /^image 0: width must be a non-negative integer, got 4.5/);
  });

  it('things that are no image, and bad options', async () => {
    await expectCode(preprocess([good, 42 as unknown as string], options), 'E_IMAGE', /^image 1 is not a path, a Buffer\/Uint8Array of an encoded image, or raw pixels/);
    await expectCode(preprocess('', options), 'E_IMAGE', /^image 0: the path is empty/);
    await expectCode(preprocess([], options), 'E_ARGUMENT', /no images given/);
    await expectCode(preprocess(good, { imgSize: 0, inChans: 3 }), 'E_ARGUMENT', /imgSize/);
    await expectCode(preprocess(good, { ...options, fit: 'stretch' as 'fill' }), 'E_ARGUMENT', /fit must be 'cover' or 'fill', got stretch/);
    await expectCode(preprocess(good, { ...options, cropFraction: 1.5 }), 'E_ARGUMENT', /cropFraction must be in \(0, 1\]/);
    await expectCode(preprocess(good, { ...options, mean: [0.5] }), 'E_ARGUMENT', /mean and std need 3 value/);
    // A padTo smaller than the image names the image.
    await expectCode(preprocess([good, good], { ...options, padTo: 32 }), 'E_ARGUMENT', /^image 0: image of 30x40 is larger than padTo 32/);
  });
});

describe('the model APIs take images as users hold them', () => {
  const files = ['photo.jpg', 'gray.jpg', 'alpha.webp', 'tiny.bmp'].map((f) => join(IMAGES, f));
  const mae = MaskedAutoencoder.create({ config: TINY, seed: 4 });
  const transform = { cropFraction: 1 };
  const tensorOf = () => preprocess(files, { imgSize: TINY.imgSize, inChans: TINY.inChans, ...transform });

  it('embed, forward, lossAndGradients, reconstruct and featureMaps equal their tensor calls', async () => {
    const tensor = await tensorOf();
    expectBitEqual(await mae.embed(files, { transform }), await mae.embed(tensor), 'embed');
    expectBitEqual(await mae.embed(files, { pool: 'cls', transform }), await mae.embed(tensor, { pool: 'cls' }), 'embed cls');
    const noise = { data: new Float32Array(4 * 16).map((_, i) => (i * 37) % 16), shape: [4, 16] };
    const forward = await mae.forward(files, { noise, transform });
    expect(forward.loss).toBe((await mae.forward(tensor, { noise })).loss);
    const grads = await mae.lossAndGradients(files, { noise, transform });
    expect(grads.loss).toBe(forward.loss);
    const rec = await mae.reconstruct(files, { noise, transform });
    expectBitEqual(rec.input, tensor, 'reconstruction input');
    expectBitEqual(rec.pasted, (await mae.reconstruct(tensor, { noise })).pasted, 'reconstruction');
    // The grid's originals default to the reconstruction's input.
    const grid = await encodeReconstructionGrid(rec);
    expect(grid.equals(await encodeReconstructionGrid(rec, tensor))).toBe(true);
    expect(grid.subarray(1, 4).toString()).toBe('PNG');
    const maps = await mae.featureMaps(files, { transform, layers: [0, -1] });
    const want = await mae.featureMaps(tensor, { layers: [0, -1] });
    maps.maps.forEach((m, i) => expectBitEqual(m, want.maps[i], `map ${i}`));
  });

  it('embed of many images goes in chunks, in order, naming a bad item by its place in the whole list', async () => {
    const many = Array.from({ length: 70 }, (_, i) => files[i % 4]);
    const features = await mae.embed(many, { transform });
    const four = await mae.embed(files, { transform });
    expect(features.shape).toEqual([70, TINY.embedDim]);
    for (const i of [0, 3, 63, 64, 69]) expect(features.data.subarray(i * 16, (i + 1) * 16)).toEqual(four.data.subarray((i % 4) * 16, (i % 4 + 1) * 16));
    many[66] = join(work, 'gone.jpg');
    await expectCode(mae.embed(many), 'E_IO', /^image 66 \(.*gone\.jpg\): cannot read/);
  });

  it('the classifier predicts and embeds images', async () => {
    const classifier = await VitClassifier.fromPretrained(mae, { numClasses: 3, seed: 1 });
    const tensor = await tensorOf();
    const p = await classifier.predict(files, { transform });
    expect(p.probabilities.data).toEqual((await classifier.predict(tensor)).probabilities.data);
    expectBitEqual(await classifier.embed(files, { transform }), await classifier.embed(tensor), 'classifier embed');
    const maps = await classifier.featureMaps(files, { transform });
    expectBitEqual(maps.maps[0], (await classifier.featureMaps(tensor)).maps[0], 'classifier featureMaps');
  });

  it('a transform given with a tensor is refused; a malformed tensor is still E_SHAPE', async () => {
    const tensor = await tensorOf();
    await expectCode(mae.embed(tensor, { transform }), 'E_ARGUMENT', /transform applies to images, not to a tensor/);
    await expectCode(mae.forward({ data: new Float32Array(3), shape: [1, 3, 16, 16] }), 'E_SHAPE', /images has 3 values but shape \[1, 3, 16, 16\] needs 768/);
    await expectCode(mae.forward({ data: [1, 2] as unknown as Float32Array, shape: [2] }), 'E_SHAPE', /images must be a tensor/);
  });
});

describe('embedding 1,000 images passed as paths', () => {
  it('holds RSS flat and keeps the event loop free', async () => {
    // Inputs of 96x96: all 1,000 preprocessed at once would be 110 MB of floats.
    const config = { ...TINY, imgSize: 96, patchSize: 16, depth: 1 };
    const mae = MaskedAutoencoder.create({ config, seed: 0 });
    const dir = join(work, 'thousand');
    mkdirSync(dir);
    const paths = Array.from({ length: 1000 }, (_, i) => {
      const data = new Uint8Array(128 * 128 * 3).map((_, j) => (j * 31 + i * 17 + ((j * i) % 13)) % 256);
      return writeTemp(`thousand/${String(i).padStart(4, '0')}.png`, encodePngPixels(128, 128, 3, data));
    });
    // Warm-up: the allocator's arenas of the decoding and libuv threads settle in two runs.
    for (let run = 0; run < 2; run++) await mae.embed(paths);
    const before = process.memoryUsage().rss;
    let peak = before;
    let last = performance.now();
    let longestGap = 0;
    let ticks = 0;
    const timer = setInterval(() => {
      const now = performance.now();
      longestGap = Math.max(longestGap, now - last);
      last = now;
      ticks++;
      peak = Math.max(peak, process.memoryUsage().rss);
    }, 5);
    const started = performance.now();
    const features = await mae.embed(paths);
    const took = performance.now() - started;
    for (let run = 0; run < 9; run++) await mae.embed(paths);
    clearInterval(timer);
    expect(features.shape).toEqual([1000, config.embedDim]);
    const mib = (bytes: number) => (bytes / 2 ** 20).toFixed(1);
    console.log(`embedded 1000 paths in ${took.toFixed(0)} ms; over 10 runs RSS peaked at +${mib(peak - before)} MiB; ${ticks} ticks, longest gap ${longestGap.toFixed(0)} ms`);
    // Flat: 10,000 more images move RSS by what the allocator keeps for reuse (measured
    // 20-70 MiB up and down, with no trend over 40 runs). All 1,000 inputs of a call
    // preprocessed at once would take 110 MB more, and a leak of 10 kB per image 100 MB.
    expect(peak - before).toBeLessThan(96 * 2 ** 20);
    // The JS thread ticks all along: the decoding and the encoder run on native threads.
    expect(longestGap).toBeLessThan(Math.max(300, took / 5));
    expect(ticks).toBeGreaterThan(took / 50);
  }, 120_000);
});
