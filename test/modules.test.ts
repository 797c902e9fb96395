// The package as a consumer project sees it, through `exports` alone: `import` and
// `require` load the same module, and the published types check under node16,
// nodenext and bundler resolution (and, for a CommonJS file, nodenext).
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const project = mkdtempSync(join(tmpdir(), 'vit-mae-consumer-'));
afterAll(() => rmSync(project, { recursive: true, force: true }));

// The package linked in as an install would place it, with the type packages the
// consumer's compiler needs beside it.
mkdirSync(join(project, 'node_modules'));
symlinkSync(root, join(project, 'node_modules', 'vit-mae'), 'dir');
symlinkSync(join(root, 'node_modules', '@types'), join(project, 'node_modules', '@types'), 'dir');
writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'consumer', private: true }));

const CONFIG = '{ imgSize: 16, patchSize: 4, inChans: 1, embedDim: 16, depth: 1, numHeads: 2, decoderEmbedDim: 8, decoderDepth: 1, decoderNumHeads: 2, mlpRatio: 4, normPixLoss: false, layerNormEps: 1e-6 }';
const PASS = `
  const mae = MaskedAutoencoder.create({ config: ${CONFIG}, seed: 3 });
  const images = { data: new Float32Array(2 * 16 * 16).map((_, i) => Math.sin(i)), shape: [2, 1, 16, 16] };
  const noise = { data: new Float32Array(2 * 16).map((_, i) => Math.cos(3 * i)), shape: [2, 16] };
  mae.forward(images, { noise }).then((out) => console.log(JSON.stringify({ loss: out.loss, error: new VitMaeError('E_BUSY', 'x').code })));
`;

function node(file: string): { loss: number; error: string } {
  return JSON.parse(execFileSync(process.execPath, [file], { cwd: project, encoding: 'utf8' }));
}

describe('module systems', () => {
  it('imports from ESM and requires from CommonJS the same module, resolved through exports', () => {
    writeFileSync(join(project, 'esm.mjs'), `import { MaskedAutoencoder, VitMaeError } from 'vit-mae';${PASS}`);
    writeFileSync(
      join(project, 'cjs.cjs'),
      `const { MaskedAutoencoder, VitMaeError } = require('vit-mae');
       if (require.resolve('vit-mae') !== require('node:fs').realpathSync(${JSON.stringify(join(root, 'dist/index.js'))})) throw new Error('resolved ' + require.resolve('vit-mae'));
       if (require('vit-mae/package.json').name !== 'vit-mae') throw new Error('package.json is not exported');${PASS}`,
    );
    const esm = node('esm.mjs');
    const cjs = node('cjs.cjs');
    expect(Number.isFinite(esm.loss)).toBe(true);
    expect(esm.error).toBe('E_BUSY');
    expect(cjs).toEqual(esm);
  });

  // A consumer file that uses the API's types; the @ts-expect-error lines fail the compile
  // if the types were missing or loose.
  const TYPED = (importLine: string) => `${importLine}
const config: MaeConfig = ${CONFIG};
const mae = MaskedAutoencoder.create({ config, seed: 0 });
const images: Tensor = { data: new Float32Array(256), shape: [1, 1, 16, 16] };
export async function run(): Promise<number> {
  const out = await mae.forward(images, { maskRatio: 0.75 });
  const code: ErrorCode = new VitMaeError('E_BUSY', 'x').code;
  // @ts-expect-error: images must be a Tensor
  await mae.forward(42);
  // @ts-expect-error: not an error code
  const wrong: ErrorCode = 'E_NOPE';
  return out.loss + code.length + wrong.length + out.mask.shape[0];
}
`;
  const ESM_IMPORT = "import { MaskedAutoencoder, VitMaeError, type ErrorCode, type MaeConfig, type Tensor } from 'vit-mae';";
  const CJS_IMPORT = "import vitMae = require('vit-mae');\nconst { MaskedAutoencoder, VitMaeError } = vitMae;\ntype ErrorCode = vitMae.ErrorCode;\ntype MaeConfig = vitMae.MaeConfig;\ntype Tensor = vitMae.Tensor;";

  const cases: [string, string, Record<string, string>][] = [
    ['an ES module under node16', 'typed.mts', { module: 'node16', moduleResolution: 'node16' }],
    ['an ES module under nodenext', 'typed.mts', { module: 'nodenext', moduleResolution: 'nodenext' }],
    ['an ES module under bundler', 'typed.ts', { module: 'esnext', moduleResolution: 'bundler' }],
    ['a CommonJS file under nodenext', 'typed.cts', { module: 'nodenext', moduleResolution: 'nodenext' }],
  ];
  it.each(cases)('the published types check in %s', (_, file, options) => {
    const dir = join(project, `${options.moduleResolution}-${file.replace('.', '-')}`);
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, file), TYPED(file.endsWith('.cts') ? CJS_IMPORT : ESM_IMPORT));
    const tsconfig = { compilerOptions: { ...options, target: 'es2022', strict: true, noEmit: true, skipLibCheck: false, types: ['node'] }, files: [file] };
    writeFileSync(join(dir, 'tsconfig.json'), JSON.stringify(tsconfig));
    const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc');
    const result = (() => {
      try {
        return execFileSync(process.execPath, [tsc, '-p', dir], { cwd: dir, encoding: 'utf8' });
      } catch (e) {
        return (e as { stdout: string }).stdout;
      }
    })();
    expect(result).toBe('');
  });
});
