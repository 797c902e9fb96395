// Quick start: create a small MAE, run the published forward pass on a batch of
// images, get every gradient, save and reload the model.
//
//   npm run example
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MaskedAutoencoder, type Tensor } from 'vit-mae';

const mae = MaskedAutoencoder.create({ preset: 'mae_vit_tiny_patch16', seed: 0 });
const { imgSize, inChans, patchSize } = mae.config;
console.log(`mae_vit_tiny_patch16: ${mae.parameterCount.toLocaleString()} trainable values on ${mae.device}`);

// A batch of 4 smooth synthetic images (normalised pixels: roughly zero mean, unit variance).
const n = 4;
const images: Tensor = { data: new Float32Array(n * inChans * imgSize * imgSize), shape: [n, inChans, imgSize, imgSize] };
images.data.forEach((_, i) => {
  const x = i % imgSize;
  const y = Math.floor(i / imgSize) % imgSize;
  const c = Math.floor(i / (imgSize * imgSize)) % inChans;
  images.data[i] = Math.sin((x + 7 * c) / 19) * Math.cos(y / 23);
});

for (const masking of ['random', 'block', 'grid'] as const) {
  const out = await mae.forward(images, { maskRatio: 0.75, masking });
  const removed = out.mask.data.reduce((a, b) => a + b, 0) / n;
  console.log(`${masking.padEnd(6)} masking: loss ${out.loss.toFixed(4)}, ${removed} of ${(imgSize / patchSize) ** 2} patches removed, latent [${out.latent.shape}]`);
}

const { loss, gradients } = await mae.lossAndGradients(images, { maskRatio: 0.75 });
const norm = Math.sqrt(Object.values(gradients).reduce((s, g) => s + g.data.reduce((a, v) => a + v * v, 0), 0));
console.log(`loss ${loss.toFixed(4)}; gradients for ${Object.keys(gradients).length} parameters, global norm ${norm.toFixed(4)}`);

const path = join(mkdtempSync(join(tmpdir(), 'vit-mae-')), 'tiny.safetensors');
await mae.save(path);
const reloaded = await MaskedAutoencoder.load(path);
console.log(`saved to ${path} and reloaded (${reloaded.checkpointFormat}, ${reloaded.parameterCount.toLocaleString()} values)`);
