// The release packages as a user gets them: native/pack.mjs packs the root package and the
// platform packages (with the CPU addon standing in for a CUDA build, since it exports the
// same API and loads without a driver), then an empty project installs the tarballs with
// cargo hidden from PATH and uses vit-mae from ESM, from CommonJS and from the CLI.
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const version = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string }).version;
const work = mkdtempSync(join(tmpdir(), 'vit-mae-package-'));
const packs = join(work, 'packs');
const project = join(work, 'project');
afterAll(() => rmSync(work, { recursive: true, force: true }));

interface Packed {
  name: string;
  tarball: string;
  bytes: number;
  unpackedBytes: number;
  files: string[];
}
let packed: Record<string, Packed>;

/** PATH without the folders that hold cargo or rustc, so that nothing here can build Rust. */
const PATH = (process.env.PATH ?? '')
  .split(delimiter)
  .filter((dir) => !['cargo', 'rustc'].some((tool) => existsSync(join(dir, tool))))
  .join(delimiter);
const env = { ...process.env, PATH, CARGO_HOME: join(work, 'no-cargo'), RUSTUP_HOME: join(work, 'no-rustup') };
delete env.VIT_MAE_CPU_ONLY;
delete env.VIT_MAE_CUDA_ADDON;

function npm(args: string[]): string {
  const result = spawnSync('npm', [...args, '--no-audit', '--no-fund'], { cwd: project, env, encoding: 'utf8' });
  expect(result.status, `npm ${args.join(' ')}\n${result.stdout}\n${result.stderr}`).toBe(0);
  return result.stdout;
}

function run(file: string, extraEnv: Record<string, string> = {}): { status: number | null; stdout: string; stderr: string } {
  return spawnSync(process.execPath, [file], { cwd: project, env: { ...env, ...extraEnv }, encoding: 'utf8' });
}

function json(file: string, extraEnv: Record<string, string> = {}): any {
  const result = run(file, extraEnv);
  expect(result.status, result.stderr).toBe(0);
  return JSON.parse(result.stdout.trim().split('\n').at(-1)!);
}

const cpuAddon = join(root, 'native', 'node', 'vit-mae.linux-x64-gnu.node');

beforeAll(() => {
  expect(existsSync(cpuAddon), 'the CPU addon is built (npm run build:native)').toBe(true);
  const standIn = join(work, 'stand-in.cuda.node');
  copyFileSync(cpuAddon, standIn);
  const out = execFileSync(process.execPath, [join(root, 'native', 'pack.mjs'), '--out', packs, '--cuda-addon', standIn], { cwd: root, encoding: 'utf8' });
  packed = Object.fromEntries((JSON.parse(out) as Packed[]).map((p) => [p.name, p]));
  mkdirSync(project);
  writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'consumer', private: true }));
}, 120_000);

const CONFIG = '{ imgSize: 16, patchSize: 4, inChans: 1, embedDim: 16, depth: 1, numHeads: 2, decoderEmbedDim: 8, decoderDepth: 1, decoderNumHeads: 2 }';
const USE = `
  const mae = MaskedAutoencoder.create({ config: ${CONFIG}, seed: 3 });
  const images = { data: new Float32Array(2 * 16 * 16).map((_, i) => Math.sin(i)), shape: [2, 1, 16, 16] };
  const noise = { data: new Float32Array(2 * 16).map((_, i) => Math.cos(3 * i)), shape: [2, 16] };
  (async () => {
    const out = await mae.forward(images, { noise });
    await mae.save('model.safetensors');
    const again = await MaskedAutoencoder.load('model.safetensors');
    const reloaded = await again.forward(images, { noise });
    console.log(JSON.stringify({ loss: out.loss, reloaded: reloaded.loss, backend: nativeBackend() }));
  })().catch((e) => { console.error(e.code, e.message); process.exit(1); });
`;

describe('the release packages', () => {
  it('root tarball: the JavaScript, types and loader, no addon, the platform package as an optional dependency', () => {
    const pkg = packed['vit-mae'];
    const allowed = /^(package\.json|README\.md|LICENSE|licenses\/[\w.-]+\.txt|dist\/[\w.-]+\.(js|js\.map|d\.ts)|native\/node\/binding\.(cjs|d\.cts))$/;
    expect(pkg.files.filter((f) => !allowed.test(f))).toEqual([]);
    for (const f of ['dist/index.js', 'dist/index.d.ts', 'dist/cli.js', 'native/node/binding.cjs', 'native/node/binding.d.cts', 'LICENSE']) expect(pkg.files).toContain(f);
    expect(pkg.bytes).toBeLessThan(250_000);
    const manifest = JSON.parse(execFileSync('tar', ['-xOzf', pkg.tarball, 'package/package.json'], { encoding: 'utf8' }));
    expect(manifest.optionalDependencies).toEqual({ 'vit-mae-linux-x64-gnu': version });
    expect(manifest.scripts).toBeUndefined();
    expect(manifest.devDependencies).toBeUndefined();
    expect(manifest.bin).toEqual({ 'vit-mae': 'dist/cli.js' });
  });

  it('platform tarballs: the addon, its licences and a manifest that fits only linux-x64 glibc', () => {
    for (const [name, file] of [['vit-mae-linux-x64-gnu', 'vit-mae.linux-x64-gnu.node'], ['vit-mae-linux-x64-gnu-cuda', 'vit-mae.linux-x64-gnu.cuda.node']]) {
      const pkg = packed[name];
      expect(pkg.files).toEqual(['LICENSE', 'README.md', 'licenses/intel-mkl.txt', 'licenses/openblas.txt', 'package.json', file]);
      expect(pkg.bytes).toBeLessThan(16_000_000);
      const manifest = JSON.parse(execFileSync('tar', ['-xOzf', pkg.tarball, 'package/package.json'], { encoding: 'utf8' }));
      expect(manifest).toMatchObject({ name, version, main: file, os: ['linux'], cpu: ['x64'], libc: ['glibc'] });
      expect(manifest.scripts).toBeUndefined();
    }
  });

  it('installs with no Rust toolchain and runs from ESM, CommonJS and the CLI', () => {
    expect(spawnSync('sh', ['-c', 'command -v cargo || command -v rustc'], { env }).status, 'cargo is hidden').not.toBe(0);
    npm(['install', packed['vit-mae'].tarball, packed['vit-mae-linux-x64-gnu'].tarball]);
    expect(readFileSync(join(project, 'node_modules/vit-mae-linux-x64-gnu/vit-mae.linux-x64-gnu.node')).length).toBeGreaterThan(1_000_000);

    writeFileSync(join(project, 'esm.mjs'), `import { MaskedAutoencoder, nativeBackend } from 'vit-mae';${USE}`);
    writeFileSync(join(project, 'cjs.cjs'), `const { MaskedAutoencoder, nativeBackend } = require('vit-mae');${USE}`);
    const esm = json('esm.mjs');
    expect(Number.isFinite(esm.loss)).toBe(true);
    expect(esm.reloaded).toBe(esm.loss);
    expect(esm.backend).toEqual({ cuda: false, path: join(project, 'node_modules/vit-mae/native/node/binding.cjs') });
    expect(json('cjs.cjs')).toEqual(esm);

    const info = spawnSync('npx', ['--no-install', 'vit-mae', 'info', 'model.safetensors'], { cwd: project, env, encoding: 'utf8' });
    expect(info.status, info.stderr).toBe(0);
    expect(info.stdout).toMatch(/embedDim\W+16/);
  });

  it('without its platform package, fails with E_NATIVE_LOAD and names the package', () => {
    const installed = join(project, 'node_modules/vit-mae-linux-x64-gnu');
    renameSync(installed, `${installed}.away`);
    try {
      const result = run('esm.mjs');
      expect(result.status).not.toBe(0);
      expect(result.stderr).toContain('E_NATIVE_LOAD');
      expect(result.stderr).toContain('vit-mae-linux-x64-gnu');
    } finally {
      renameSync(`${installed}.away`, installed);
    }
  });

  it('uses the CUDA package once installed, unless told not to or its version differs', () => {
    npm(['install', packed['vit-mae-linux-x64-gnu-cuda'].tarball]);
    const cudaDir = join(project, 'node_modules/vit-mae-linux-x64-gnu-cuda');
    const withCuda = json('esm.mjs');
    expect(withCuda.backend).toEqual({ cuda: true, path: join(cudaDir, 'vit-mae.linux-x64-gnu.cuda.node') });
    expect(withCuda.loss).toBe(json('cjs.cjs').loss);
    expect(json('esm.mjs', { VIT_MAE_CPU_ONLY: '1' }).backend.cuda).toBe(false);

    const manifestPath = join(cudaDir, 'package.json');
    const manifest = readFileSync(manifestPath, 'utf8');
    writeFileSync(manifestPath, JSON.stringify({ ...JSON.parse(manifest), version: '0.0.1' }));
    try {
      const mismatched = json('esm.mjs').backend;
      expect(mismatched.cuda).toBe(false);
      expect(mismatched.fallbackReason).toContain(`vit-mae-linux-x64-gnu-cuda 0.0.1 is installed, but vit-mae is ${version}`);
    } finally {
      writeFileSync(manifestPath, manifest);
    }
  });
});
