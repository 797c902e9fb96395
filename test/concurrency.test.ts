// Concurrent saves to one path, from one process and from another at once, while a third
// process reads the path over and over: every save resolves, every read is one whole
// model, and no temporary file is left. The children run the built package (dist/).
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { MaskedAutoencoder } from '../ts/index.js';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const dist = pathToFileURL(join(root, 'dist', 'index.js')).href;
const dir = mkdtempSync(join(tmpdir(), 'vit-mae-concurrency-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Runs an ES module `source` in a child Node process with `args`; `onStdout` sees its output so far. */
function child(source: string, args: string[], onStdout: (stdout: string) => void = () => {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const script = join(dir, `child-${readdirSync(dir).length}.mjs`);
  writeFileSync(script, source);
  const node = spawn(process.execPath, [script, ...args], { cwd: root });
  let stdout = '';
  let stderr = '';
  node.stdout.on('data', (chunk: Buffer) => onStdout((stdout += chunk.toString())));
  node.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  return new Promise((resolveExit) => node.on('exit', (code) => resolveExit({ code, stdout, stderr })));
}

/** Saves the model of `source` to `target` `count` times at once; prints `saved` when every save resolved. */
const SAVER = `import { MaskedAutoencoder } from ${JSON.stringify(dist)};
const [source, target, count] = process.argv.slice(2);
const mae = await MaskedAutoencoder.load(source);
await Promise.all(Array.from({ length: Number(count) }, () => mae.save(target)));
console.log('saved');`;

/**
 * Reads `target` until `stop` exists and prints the sizes of reads that were neither
 * model (as JSON: reads, bad). Prints `ready` once it has started.
 */
const READER = `import { existsSync, readFileSync } from 'node:fs';
const [target, a, b, stop] = process.argv.slice(2);
const models = [readFileSync(a), readFileSync(b)];
let reads = 0;
const bad = [];
console.log('ready');
while (!existsSync(stop)) {
  let bytes;
  try { bytes = readFileSync(target); } catch { continue; }
  reads += 1;
  if (!models.some((m) => m.equals(bytes))) bad.push(bytes.length);
}
console.log(JSON.stringify({ reads, bad }));`;

describe('concurrent saves to one path', () => {
  it('each resolve, from one process and another, and a reader only ever sees a whole model', async () => {
    // The Fashion-MNIST preset: 5.3 MB files, long enough to write for saves to overlap.
    const models = [1, 2].map((seed) => MaskedAutoencoder.create({ preset: 'mae_vit_fmnist_patch4_32', seed }));
    const references = ['a.safetensors', 'b.safetensors'].map((name) => join(dir, name));
    await Promise.all(models.map((m, i) => m.save(references[i])));
    const target = join(dir, 'shared.safetensors');
    await models[0].save(target);
    const stop = join(dir, 'stop');

    let readerReady: () => void = () => {};
    const ready = new Promise<void>((r) => (readerReady = r));
    const reader = child(READER, [target, ...references, stop], (stdout) => stdout.startsWith('ready\n') && readerReady());
    await ready;
    const otherProcess = child(SAVER, [references[1], target, '24']);
    const here = await Promise.allSettled(Array.from({ length: 24 }, (_, i) => models[i % 2].save(target)));
    const other = await otherProcess;
    writeFileSync(stop, '');
    const read = await reader;

    expect(here.filter((r) => r.status === 'rejected').map((r) => String((r as PromiseRejectedResult).reason))).toEqual([]);
    expect(other.code, other.stderr).toBe(0);
    expect(other.stdout.trim()).toBe('saved');
    expect(read.code, read.stderr).toBe(0);
    const { reads, bad } = JSON.parse(read.stdout.trim().split('\n').at(-1)!) as { reads: number; bad: number[] };
    expect(bad, `${bad.length} of ${reads} reads were not a whole model`).toEqual([]);
    expect(reads).toBeGreaterThan(0);
    const final = readFileSync(target);
    expect(references.some((r) => readFileSync(r).equals(final))).toBe(true);
    const left = readdirSync(dir).filter((name) => name.endsWith('.tmp'));
    expect(left).toEqual([]);
    expect(existsSync(stop)).toBe(true);
  });
});
