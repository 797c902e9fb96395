// The `vit-mae` command line end to end (runs the built dist/cli.js), on the
// shipped Fashion-MNIST subset with a tiny model.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, pngSize, readSafetensors } from './helpers.js';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'dist', 'cli.js');
const data = join(root, 'data', 'fashion-mnist', 'train-images-idx3-ubyte.gz');
const dir = mkdtempSync(join(tmpdir(), 'vit-mae-cli-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const TINY = JSON.stringify({ imgSize: 16, embedDim: 16, depth: 1, numHeads: 2, decoderEmbedDim: 8, decoderDepth: 1, decoderNumHeads: 2 });
const pretrainArgs = (out: string, extra: string[] = []) => [
  cli, 'pretrain', '--data', data, '--preset', 'mae_vit_fmnist_patch4_32', '--config', TINY, '--out', out,
  '--epochs', '2', '--warmup-epochs', '1', '--batch-size', '64', '--lr', '0.002', '--workers', '1', '--json', ...extra,
];

function run(args: string[]) {
  return spawnSync(process.execPath, args, { encoding: 'utf8', cwd: root });
}

function jsonLines(stdout: string): Record<string, any>[] {
  return stdout.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l));
}

describe('vit-mae CLI', () => {
  it('prints help for the program and each command', () => {
    const top = run([cli, '--help']);
    expect(top.status).toBe(0);
    for (const command of ['pretrain', 'reconstruct', 'info']) {
      expect(top.stdout).toContain(command);
      const help = run([cli, command, '--help']);
      expect(help.status, command).toBe(0);
      expect(help.stdout).toMatch(/Usage: vit-mae/);
    }
  });

  it('exits 2 on bad usage and 1 with the error code on failure', () => {
    expect(run([cli, 'frobnicate']).status).toBe(2);
    expect(run([cli, 'pretrain']).status).toBe(2); // --data is required
    expect(run([cli, 'pretrain', '--data', data, '--epochs', 'many']).status).toBe(2);
    const missing = run([cli, 'info', join(dir, 'missing.safetensors')]);
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/E_CHECKPOINT_NOT_FOUND/);
  });

  it('info describes a checkpoint', () => {
    const out = run([cli, 'info', fixture('mae-tiny.weights.safetensors'), '--json']);
    expect(out.status).toBe(0);
    const info = JSON.parse(out.stdout);
    expect(info).toMatchObject({ format: 'safetensors', freshDecoder: false, config: { embedDim: 48, depth: 2, numHeads: 3 } });
    expect(run([cli, 'info', fixture('mae-tiny.hf')]).stdout).toMatch(/format: huggingface/);
  });

  it('pretrains with JSON events, writes checkpoints, the model and a reconstruction; reconstruct reads it back', () => {
    const out = join(dir, 'run');
    const result = run(pretrainArgs(out, ['--max-steps', '6', '--checkpoint-every', '3', '--keep-last', '1']));
    expect(result.status, result.stderr).toBe(0);
    const events = jsonLines(result.stdout);
    expect(events.filter((e) => e.type === 'step').map((e) => e.step)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(events.filter((e) => e.type === 'checkpoint').map((e) => e.step)).toEqual([3, 6]);
    const summary = events.at(-1)!;
    expect(summary).toMatchObject({ type: 'summary', steps: 6, aborted: false });
    expect(existsSync(join(out, 'checkpoints', 'checkpoint-00000006.safetensors'))).toBe(true);
    expect(existsSync(join(out, 'checkpoints', 'checkpoint-00000003.safetensors'))).toBe(false); // --keep-last 1
    expect(pngSize(readFileSync(join(out, 'reconstruction.png'))).width).toBe(4 * 128 + 5 * 2);

    const png = join(dir, 'again.png');
    const rec = run([cli, 'reconstruct', join(out, 'model.safetensors'), '--data', data, '--count', '3', '--out', png, '--json']);
    expect(rec.status, rec.stderr).toBe(0);
    expect(JSON.parse(rec.stdout)).toMatchObject({ type: 'reconstruction', path: png });
    expect(pngSize(readFileSync(png)).height).toBe(3 * 128 + 4 * 2);
  });

  it('resumes after SIGKILL to the same weights as an uninterrupted run', async () => {
    const steps = ['--max-steps', '40', '--checkpoint-every', '4'];
    const straight = join(dir, 'straight');
    expect(run(pretrainArgs(straight, steps)).status).toBe(0);

    const killed = join(dir, 'killed');
    const child = spawn(process.execPath, pretrainArgs(killed, steps), { cwd: root });
    let buffered = '';
    const signal = await new Promise<NodeJS.Signals | null>((resolveExit) => {
      child.stdout.on('data', (chunk: Buffer) => {
        buffered += chunk.toString();
        if (/"type":"checkpoint"/.test(buffered)) child.kill('SIGKILL');
      });
      child.on('exit', (_code, sig) => resolveExit(sig));
    });
    expect(signal).toBe('SIGKILL');
    expect(existsSync(join(killed, 'model.safetensors'))).toBe(false);

    const resumed = run(pretrainArgs(killed, [...steps, '--resume']));
    expect(resumed.status, resumed.stderr).toBe(0);
    const firstStep = jsonLines(resumed.stdout).find((e) => e.type === 'step')!;
    expect(firstStep.step).toBeGreaterThan(1);
    const a = readSafetensors(join(straight, 'model.safetensors')).tensors;
    const b = readSafetensors(join(killed, 'model.safetensors')).tensors;
    expect(Object.keys(b).sort()).toEqual(Object.keys(a).sort());
    for (const name of Object.keys(a)) expect(Buffer.from(b[name].data.buffer).equals(Buffer.from(a[name].data.buffer)), name).toBe(true);
  });
});
