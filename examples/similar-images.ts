// Similar images: embed every image of a folder with a pre-trained MAE, then print the
// images nearest to a query image by the cosine similarity of their embeddings (the
// encoder's mean-pooled features, as the paper's kNN evaluation uses).
//
//   npx tsx examples/similar-images.ts <model> <folder> <query-image> [--top 5] [--crop-fraction 0.875]
//
// <model> is any checkpoint vit-mae loads (`npm run demo` writes one trained on
// Fashion-MNIST). Images are passed to `embed` as paths: vit-mae decodes and resizes them
// natively, 64 at a time, off the JS thread.
import { readdirSync } from 'node:fs';
import { extname, join } from 'node:path';
import { parseArgs } from 'node:util';
import { MaskedAutoencoder, PUBLISHED_CROP_FRACTION, type Tensor } from 'vit-mae';

const EXTENSIONS = new Set(['.png', '.jpg', '.jpeg', '.gif', '.bmp', '.webp', '.tif', '.tiff']);

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { top: { type: 'string', default: '5' }, 'crop-fraction': { type: 'string', default: String(PUBLISHED_CROP_FRACTION) } },
});
if (positionals.length !== 3) {
  console.error('usage: similar-images.ts <model> <folder> <query-image> [--top 5] [--crop-fraction 0.875]');
  process.exit(2);
}
const [modelPath, folder, query] = positionals;
const top = Number(values.top);
const transform = { cropFraction: Number(values['crop-fraction']) };

/** Image files under `dir`, recursively, sorted. */
function imageFiles(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((entry) => entry.isFile() && EXTENSIONS.has(extname(entry.name).toLowerCase()))
    .map((entry) => join(entry.parentPath, entry.name))
    .sort();
}

/** Each row of `[N, D]` scaled to unit length, so that dot products are cosines. */
function normalised(features: Tensor): Float32Array[] {
  const [n, d] = features.shape;
  return Array.from({ length: n }, (_, i) => {
    const row = features.data.slice(i * d, (i + 1) * d);
    const norm = Math.hypot(...row) || 1;
    return row.map((v) => v / norm);
  });
}

const mae = await MaskedAutoencoder.load(modelPath);
const files = imageFiles(folder);
if (files.length === 0) {
  console.error(`no images under ${folder}`);
  process.exit(1);
}
const index = normalised(await mae.embed(files, { transform }));
const [target] = normalised(await mae.embed(query, { transform }));
const ranked = index
  .map((row, i) => ({ file: files[i], similarity: row.reduce((sum, v, k) => sum + v * target[k], 0) }))
  .sort((a, b) => b.similarity - a.similarity)
  .slice(0, top);

console.log(`${files.length} images embedded; nearest to ${query}:`);
for (const [rank, { file, similarity }] of ranked.entries()) console.log(`${rank + 1}. ${similarity.toFixed(4)}  ${file}`);
