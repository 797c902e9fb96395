// Which native addon the package loads: the CUDA addon when it loads, otherwise the CPU one.
// Each case runs the built package (dist/) in a fresh `node`, since the choice is made once,
// when the package is imported.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const dir = mkdtempSync(join(tmpdir(), 'vit-mae-native-load-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const script = join(dir, 'load.mjs');
writeFileSync(
  script,
  `
const dist = ${JSON.stringify(pathToFileURL(join(root, 'dist')).href)};
const { MaskedAutoencoder, nativeBackend } = await import(dist + '/index.js');
const config = { imgSize: 16, patchSize: 8, inChans: 3, embedDim: 16, depth: 1, numHeads: 2,
  decoderEmbedDim: 8, decoderDepth: 1, decoderNumHeads: 2 };
const mae = MaskedAutoencoder.create({ config, seed: 0 });
const data = Float32Array.from({ length: 2 * 3 * 16 * 16 }, (_, i) => Math.sin(i));
const out = await mae.forward({ data, shape: [2, 3, 16, 16] }, { maskRatio: 0.75 });
console.log(JSON.stringify({ backend: nativeBackend(), loss: out.loss, candleThreads: process.env.CANDLE_NUM_THREADS }));
`,
);

const garbage = join(dir, 'garbage.cuda.node');
writeFileSync(garbage, 'this is not a shared library\n');

interface Loaded {
  backend: { cuda: boolean; path: string; fallbackReason?: string };
  loss: number;
  candleThreads?: string;
}

function load(env: Record<string, string>): Loaded {
  const clean = { ...process.env };
  delete clean.VIT_MAE_CPU_ONLY;
  delete clean.VIT_MAE_CUDA_ADDON;
  delete clean.CANDLE_NUM_THREADS;
  const child = spawnSync(process.execPath, [script], { encoding: 'utf8', cwd: root, env: { ...clean, ...env } });
  expect(child.status, child.stderr).toBe(0);
  const loaded = JSON.parse(child.stdout.trim().split('\n').at(-1)!) as Loaded;
  expect(Number.isFinite(loaded.loss)).toBe(true);
  return loaded;
}

describe('native addon loading', () => {
  it('falls back to the CPU addon when the CUDA addon does not load, and says why', () => {
    const { backend } = load({ VIT_MAE_CUDA_ADDON: garbage });
    expect(backend.cuda).toBe(false);
    expect(backend.path).toMatch(/binding\.cjs$/);
    expect(backend.fallbackReason).toContain(garbage);
    expect(backend.fallbackReason).toMatch(/could not be loaded/);
  });

  it('never tries the CUDA addon under VIT_MAE_CPU_ONLY=1', () => {
    const { backend } = load({ VIT_MAE_CUDA_ADDON: garbage, VIT_MAE_CPU_ONLY: '1' });
    expect(backend).toEqual({ cuda: false, path: expect.stringMatching(/binding\.cjs$/) });
  });

  it('reports a VIT_MAE_CUDA_ADDON that names no file', () => {
    const missing = join(dir, 'missing.node');
    const { backend } = load({ VIT_MAE_CUDA_ADDON: missing });
    expect(backend.cuda).toBe(false);
    expect(backend.fallbackReason).toContain(missing);
    expect(backend.fallbackReason).toMatch(/does not exist/);
  });

  it("gives candle one pool thread unless the user's environment says otherwise", () => {
    expect(load({ VIT_MAE_CPU_ONLY: '1' }).candleThreads).toBe('1');
    expect(load({ VIT_MAE_CPU_ONLY: '1', CANDLE_NUM_THREADS: '2' }).candleThreads).toBe('2');
  });

  it('uses the addon VIT_MAE_CUDA_ADDON names when it loads', () => {
    // The CPU addon itself stands in for a CUDA addon that loads: same API, no driver needed.
    const cpu = readdirSync(join(root, 'native', 'node')).find((f) => /^vit-mae\..+\.node$/.test(f) && !f.includes('.cuda.'));
    expect(cpu, 'the CPU addon is built (npm run build:native)').toBeDefined();
    const path = join(root, 'native', 'node', cpu!);
    const { backend } = load({ VIT_MAE_CUDA_ADDON: path });
    expect(backend).toEqual({ cuda: true, path });
  });
});
