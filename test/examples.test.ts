// What a new user runs first, as the README and examples/ write it: every example script
// runs (examples/study.ts in study.test.ts, at its --quick budget), `npm run demo` trains
// and writes its model and grid, every `npm run` script the README names exists, and the
// README's TypeScript blocks type-check against the package's published types.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { copyFileSync } from 'node:fs';
import { MaskedAutoencoder } from '../ts/index.js';
import { TINY, writeImageFolder } from './helpers.js';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const work = mkdtempSync(join(tmpdir(), 'vit-mae-examples-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

const readme = readFileSync(join(root, 'README.md'), 'utf8');
const scripts = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts;

/** Runs an npm script as the README writes it; returns what it printed (the CLI's human output goes to stderr). */
function npmRun(args: string[]): string {
  const result = spawnSync('npm', ['run', '--silent', ...args], { cwd: root, encoding: 'utf8', maxBuffer: 64 << 20 });
  expect(result.status, `npm run ${args.join(' ')}\n${result.stdout}\n${result.stderr}`).toBe(0);
  return result.stdout + result.stderr;
}

describe('examples', () => {
  it('every script in examples/ is run by a test', () => {
    // The test that runs each example; a new example fails here until it has one.
    const runBy: Record<string, string> = {
      'quickstart.ts': 'test/examples.test.ts',
      'study.ts': 'test/study.test.ts',
      'similar-images.ts': 'test/examples.test.ts',
      'embedding-server.ts': 'test/examples.test.ts',
    };
    const examples = readdirSync(join(root, 'examples')).filter((f) => f.endsWith('.ts'));
    expect(examples.sort()).toEqual(Object.keys(runBy).sort());
    for (const [example, test] of Object.entries(runBy)) expect(readFileSync(join(root, test), 'utf8')).toContain(`examples/${example}`);
  });

  it('npm run example runs examples/quickstart.ts: three maskings, every gradient, save and reload', () => {
    expect(scripts.example).toBe('tsx examples/quickstart.ts');
    const lines = npmRun(['example']).trim().split('\n');
    const count = /^mae_vit_tiny_patch16: ([\d,]+) trainable values on cpu$/.exec(lines[0]);
    expect(count, lines[0]).not.toBeNull();
    // 224 / 16 = 14 patches a side; 75% of 196 removed, 49 kept plus the cls token.
    for (const [i, masking] of ['random', 'block', 'grid'].entries()) {
      expect(lines[1 + i]).toMatch(new RegExp(`^${masking} +masking: loss \\d+\\.\\d{4}, 147 of 196 patches removed, latent \\[4,50,192\\]$`));
    }
    expect(lines[4]).toMatch(/^loss \d+\.\d{4}; gradients for 204 parameters, global norm \d+\.\d{4}$/);
    expect(lines[5]).toMatch(new RegExp(`^saved to .+tiny\\.safetensors and reloaded \\(safetensors, ${count![1]} values\\)$`));
    expect(lines).toHaveLength(6);
  });

  it('npm run demo pre-trains on the shipped Fashion-MNIST and writes the model and the reconstruction grid', () => {
    const out = join(work, 'demo');
    const printed = npmRun(['demo', '--', '--out', out]); // the README's command, its output moved out of the clone
    expect(printed).toMatch(/^done: 31 steps, final loss \d+\.\d+, 3968 images in /m);
    expect(printed).toContain(`model: ${join(out, 'model.safetensors')}`);
    expect(statSync(join(out, 'model.safetensors')).size).toBeGreaterThan(4_000_000);
    expect(readFileSync(join(out, 'reconstruction.png')).subarray(1, 4).toString()).toBe('PNG');
  });
});

/** Runs an example script as a user would (`tsx`, `vit-mae` resolved to this package); returns its stdout. */
function runExample(script: string, args: string[]): string {
  const result = spawnSync(process.execPath, ['--import', 'tsx', join(root, 'examples', script), ...args], { cwd: root, encoding: 'utf8' });
  expect(result.status, `${script} ${args.join(' ')}\n${result.stdout}\n${result.stderr}`).toBe(0);
  return result.stdout;
}

/** A tiny MAE saved in the work folder, and the model loaded. */
async function savedModel(name: string): Promise<{ path: string; mae: MaskedAutoencoder }> {
  const mae = MaskedAutoencoder.create({ config: TINY, seed: 5 });
  const path = join(work, `${name}.safetensors`);
  await mae.save(path);
  return { path, mae };
}

const cosine = (a: Float32Array, b: Float32Array) => a.reduce((s, v, i) => s + v * b[i], 0) / Math.hypot(...a) / Math.hypot(...b);

describe('examples/similar-images.ts', () => {
  it('embeds a folder and ranks it by cosine similarity to the query', async () => {
    const { path, mae } = await savedModel('similar');
    const folder = join(work, 'similar-folder');
    writeImageFolder(folder, ['left', 'middle', 'right'], 4);
    const query = join(work, 'query.png');
    copyFileSync(join(folder, 'middle', '002.png'), query);
    const lines = runExample('similar-images.ts', [path, folder, query, '--top', '4']).trim().split('\n');
    expect(lines[0]).toBe(`12 images embedded; nearest to ${query}:`);
    expect(lines).toHaveLength(5);
    const ranked = lines.slice(1).map((line) => /^(\d)\. (-?\d\.\d{4})  (.+)$/.exec(line)!);
    expect(ranked.every(Boolean), lines.join('\n')).toBe(true);
    // The query's own copy first, at similarity 1; then in decreasing order.
    expect(ranked[0][3]).toBe(join(folder, 'middle', '002.png'));
    expect(ranked[0][2]).toBe('1.0000');
    const similarities = ranked.map((m) => Number(m[2]));
    expect([...similarities].sort((a, b) => b - a)).toEqual(similarities);
    // Each printed similarity is the cosine of the embeddings the library gives.
    const transform = { cropFraction: 224 / 256 };
    const [target] = [(await mae.embed(query, { transform })).data];
    for (const m of ranked) expect(Number(m[2])).toBeCloseTo(cosine((await mae.embed(m[3], { transform })).data, target), 4);
  });
});

describe('examples/embedding-server.ts', () => {
  it('answers POSTed images with their embeddings, batching requests that arrive together', async () => {
    const { path, mae } = await savedModel('server');
    const server = spawn(process.execPath, ['--import', 'tsx', join(root, 'examples', 'embedding-server.ts'), path, '--port', '0', '--window-ms', '200'], { cwd: root });
    try {
      let stderr = '';
      server.stderr.on('data', (chunk: Buffer) => (stderr += chunk));
      const url = await new Promise<string>((resolve, reject) => {
        let out = '';
        server.stdout.on('data', (chunk: Buffer) => {
          out += chunk;
          const m = /at (http:\/\/127\.0\.0\.1:\d+\/embed)/.exec(out);
          if (m) resolve(m[1]);
        });
        server.on('exit', (code) => reject(new Error(`server exited with ${code}: ${stderr}`)));
      });
      const images = ['photo.jpg', 'gray.jpg', 'alpha.webp', 'tiny.bmp'].map((f) => readFileSync(join(root, 'test', 'fixtures', 'images', f)));
      // Sent together: answered from one or more batches, at least one of several images.
      const answers = await Promise.all(
        images.map(async (body) => {
          const response = await fetch(url, { method: 'POST', body });
          expect(response.status).toBe(200);
          return (await response.json()) as { embedding: number[]; dim: number; batchSize: number };
        }),
      );
      expect(Math.max(...answers.map((a) => a.batchSize))).toBeGreaterThan(1);
      for (const [i, answer] of answers.entries()) {
        expect(answer.dim).toBe(TINY.embedDim);
        const want = (await mae.embed(images[i])).data;
        // A row of a batch matches the image embedded alone to float rounding.
        for (const [k, v] of answer.embedding.entries()) expect(v).toBeCloseTo(want[k], 5);
      }
      const junk = await fetch(url, { method: 'POST', body: 'not an image' });
      expect(junk.status).toBe(400);
      expect(((await junk.json()) as { error: { code: string } }).error.code).toBe('E_IMAGE');
      expect((await fetch(url)).status).toBe(405);
      expect((await fetch(url.replace('/embed', '/other'), { method: 'POST', body: images[0] })).status).toBe(404);
    } finally {
      server.kill('SIGTERM');
    }
    const code = await new Promise<number | null>((resolve) => (server.exitCode !== null ? resolve(server.exitCode) : server.on('exit', resolve)));
    expect(code).toBe(0);
  }, 60_000);
});

describe('the README', () => {
  it('names only npm scripts that exist', () => {
    const named = new Set([...readme.matchAll(/npm run ([\w:-]+)/g)].map((m) => m[1]));
    expect(named.size).toBeGreaterThan(5);
    for (const script of named) expect(scripts, `npm run ${script}`).toHaveProperty(script);
  });

  it('has TypeScript examples (and examples/ has scripts) that type-check against the published types', () => {
    const blocks = [...readme.matchAll(/^```ts\n([\s\S]*?)^```$/gm)].map((m) => m[1]);
    expect(blocks.length).toBeGreaterThanOrEqual(3);
    const project = join(work, 'readme');
    mkdirSync(join(project, 'node_modules'), { recursive: true });
    symlinkSync(root, join(project, 'node_modules', 'vit-mae'), 'dir');
    symlinkSync(join(root, 'node_modules', '@types'), join(project, 'node_modules', '@types'), 'dir');
    writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'readme', private: true, type: 'module' }));
    // A block may use what an earlier one made (its comment says so): those names are
    // declared, with the types the earlier blocks give them, where a block uses them
    // without defining them.
    const carried: Record<string, string> = { mae: "import('vit-mae').MaskedAutoencoder", images: "import('vit-mae').Tensor" };
    const files = blocks.map((block, i) => {
      const declared = Object.entries(carried)
        .filter(([name]) => new RegExp(`\\b${name}\\b`).test(block) && !new RegExp(`\\bconst ${name}\\b`).test(block))
        .map(([name, type]) => `declare const ${name}: ${type};`);
      const file = `block-${i + 1}.ts`;
      writeFileSync(join(project, file), `${block}\n${declared.join('\n')}\nexport {};\n`);
      return file;
    });
    // The examples that import the package as users do, type-checked the same way.
    for (const example of ['quickstart.ts', 'similar-images.ts', 'embedding-server.ts']) {
      copyFileSync(join(root, 'examples', example), join(project, example));
      files.push(example);
    }
    const tsconfig = { compilerOptions: { module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', strict: true, noEmit: true, skipLibCheck: false, types: ['node'] }, files };
    writeFileSync(join(project, 'tsconfig.json'), JSON.stringify(tsconfig));
    const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc');
    let output = '';
    try {
      execFileSync(process.execPath, [tsc, '-p', project], { cwd: project, encoding: 'utf8' });
    } catch (e) {
      output = (e as { stdout: string }).stdout;
    }
    expect(output).toBe('');
    expect(existsSync(join(project, 'block-1.js'))).toBe(false); // checked, not emitted
  });
});
