// The `vit-mae` command line end to end (runs the built dist/cli.js), on the
// shipped Fashion-MNIST subset with a tiny model.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MaskedAutoencoder, VitClassifier, type MaeConfig } from '../ts/index.js';
import { encodeIdxImages, encodeIdxLabels, fixture, pngSize, readSafetensors, writeHuggingFaceEncoder, writeImageFolder } from './helpers.js';

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

  it('without a command prints the usage to stderr and exits 2', () => {
    const bare = run([cli]);
    expect(bare.status).toBe(2);
    expect(bare.stderr).toMatch(/Usage: vit-mae/);
    expect(bare.stdout).toBe('');
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
    // A PCA target names itself and its coefficients; its basis is among the tensors.
    const pca = run([cli, 'info', fixture('mae-tiny-pca.weights.safetensors')]);
    expect(pca.status, pca.stderr).toBe(0);
    expect(pca.stdout).toMatch(/normPixLoss: false\n\s*target: pca\n\s*pcaComponents: 10\n/);
    const pcaJson = JSON.parse(run([cli, 'info', fixture('mae-tiny-pca.weights.safetensors'), '--json']).stdout);
    expect(pcaJson).toMatchObject({ config: { target: 'pca', pcaComponents: 10 }, tensors: { pca_mean: [48], pca_components: [10, 48], 'decoder_pred.weight': [10, 32] } });
    const encoder = join(dir, 'encoder.hf');
    writeHuggingFaceEncoder(encoder);
    const text = run([cli, 'info', encoder]);
    expect(text.status, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/format: huggingface\n[^]*decoder: not in the checkpoint \(encoder only\)/);
    const extra = join(dir, 'extra.hf');
    writeHuggingFaceEncoder(extra);
    writeFileSync(join(extra, 'config.json'), JSON.stringify({ ...JSON.parse(readFileSync(join(extra, 'config.json'), 'utf8')), mask_ratio: 0.6 }));
    expect(run([cli, 'info', extra]).stdout).toMatch(/ignored config\.json fields: mask_ratio\n/);
    expect(JSON.parse(run([cli, 'info', extra, '--json']).stdout)).toMatchObject({ freshDecoder: true, ignoredConfigFields: ['mask_ratio'] });
  });

  it('info on a .pth whose widths match no preset says what it holds and which fields to pass, and exits 0', () => {
    const pth = fixture('mae-tiny.pth');
    const text = run([cli, 'info', pth]);
    expect(text.status, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/format: pth/);
    expect(text.stdout).toMatch(/embedDim: 48\n/);
    expect(text.stdout).toMatch(/depth: 2\n/);
    expect(text.stdout).toMatch(/patchSize: 4\n/);
    expect(text.stdout).toMatch(/unknown: numHeads, decoderNumHeads .*--config '\{"numHeads":"N","decoderNumHeads":"N"\}'/);
    const json = run([cli, 'info', pth, '--json']);
    expect(json.status, json.stderr).toBe(0);
    const info = JSON.parse(json.stdout);
    expect(info).toMatchObject({ format: 'pth', unknown: ['numHeads', 'decoderNumHeads'], config: { embedDim: 48, depth: 2, patchSize: 4, imgSize: 32, decoderEmbedDim: 32, decoderDepth: 2 } });
    expect(info.tensors['blocks.0.attn.qkv.weight']).toEqual([144, 48]);
    expect(info.config.numHeads).toBeUndefined();
    // Given the head counts, it describes the model as for any other file.
    const full = run([cli, 'info', pth, '--json', '--config', '{"numHeads": 3, "decoderNumHeads": 4}']);
    expect(full.status, full.stderr).toBe(0);
    expect(JSON.parse(full.stdout)).toMatchObject({ format: 'pth', config: { numHeads: 3, decoderNumHeads: 4 } });
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

    // Image files instead of a dataset: one row each; not both, not neither.
    const images = ['photo.jpg', 'alpha.webp'].map((f) => join(root, 'test', 'fixtures', 'images', f));
    const filesPng = join(dir, 'files.png');
    const fromFiles = run([cli, 'reconstruct', join(out, 'model.safetensors'), ...images, '--crop-fraction', '1', '--out', filesPng, '--json']);
    expect(fromFiles.status, fromFiles.stderr).toBe(0);
    expect(JSON.parse(fromFiles.stdout)).toMatchObject({ type: 'reconstruction', path: filesPng });
    expect(pngSize(readFileSync(filesPng)).height).toBe(2 * 128 + 3 * 2);
    for (const args of [[...images, '--data', data], []]) {
      const refused = run([cli, 'reconstruct', join(out, 'model.safetensors'), ...args, '--out', join(dir, 'never.png')]);
      expect(refused.status).toBe(2);
      expect(refused.stderr).toContain('reconstruct takes image files or --data, not both and not neither');
    }
    const missing = run([cli, 'reconstruct', join(out, 'model.safetensors'), join(dir, 'gone.png'), '--out', join(dir, 'never.png')]);
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/^error \[E_IO\]: image 0 \(.*gone\.png\): cannot read/m);
  });

  it("pretrains a 'pca' target given in --config: the basis event first, then a model info describes", () => {
    const out = join(dir, 'pca');
    const config = JSON.stringify({ ...JSON.parse(TINY), target: 'pca', pcaComponents: 4 });
    const result = run(pretrainArgs(out, ['--max-steps', '2']).map((arg) => (arg === TINY ? config : arg)));
    expect(result.status, result.stderr).toBe(0);
    const events = jsonLines(result.stdout);
    const types = events.map((e) => e.type);
    expect(types.indexOf('pcaBasis')).toBeLessThan(types.indexOf('step'));
    // The first 256 images of the first epoch, 16 patches of 4x4 each.
    expect(events.find((e) => e.type === 'pcaBasis')).toMatchObject({ components: 4, images: 256, patches: 256 * 16 });
    const info = JSON.parse(run([cli, 'info', join(out, 'model.safetensors'), '--json']).stdout);
    expect(info).toMatchObject({ config: { target: 'pca', pcaComponents: 4, normPixLoss: false }, tensors: { pca_mean: [16], pca_components: [4, 16] } });
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

describe('vit-mae CLI: fine-tuning, evaluation and embeddings', () => {
  const mae = join(dir, 'tiny-mae.safetensors');
  const images = join(dir, 'labelled'); // a/000.png ... b/002.png: 6 images, 2 classes
  const idxImages = join(dir, 'tiny-images-idx3-ubyte');
  const idxLabels = join(dir, 'tiny-labels-idx1-ubyte');
  const IDX_LABELS = [0, 1, 2, 0, 1, 2, 0, 1];

  beforeAll(async () => {
    const model = MaskedAutoencoder.create({ preset: 'mae_vit_fmnist_patch4_32', config: JSON.parse(TINY) as Partial<MaeConfig>, seed: 0 });
    await model.save(mae);
    writeImageFolder(images, ['a', 'b'], 3);
    writeFileSync(idxImages, encodeIdxImages(IDX_LABELS.length, 16, 16, (i, x, y) => (IDX_LABELS[i] * 80 + x * 5 + y * 3 + i) % 256));
    writeFileSync(idxLabels, encodeIdxLabels(IDX_LABELS));
  });

  const train = (command: 'finetune' | 'linprobe', out: string, extra: string[] = []) =>
    run([cli, command, mae, '--data', images, '--num-classes', '2', '--epochs', '1', '--warmup-epochs', '0', '--batch-size', '2', '--max-steps', '2', '--workers', '1', '--out', out, '--json', ...extra]);

  // A default warm-up longer than the run is allowed: the rate rises throughout.
  it('finetune and linprobe run a short job with the default warm-up', () => {
    for (const command of ['finetune', 'linprobe']) {
      const out = join(dir, `default-warmup-${command}`);
      const result = run([cli, command, mae, '--data', images, '--num-classes', '2', '--epochs', '1', '--batch-size', '2', '--max-steps', '2', '--workers', '1', '--out', out, '--json']);
      expect(result.status, `${command}: ${result.stderr}`).toBe(0);
      expect(existsSync(join(out, 'model.safetensors'))).toBe(true);
    }
  });

  it('lists the new commands in the help', () => {
    const top = run([cli, '--help']);
    for (const command of ['finetune', 'linprobe', 'eval', 'embed']) {
      expect(top.stdout).toContain(command);
      const help = run([cli, command, '--help']);
      expect(help.status, command).toBe(0);
      expect(help.stdout).toMatch(/Usage: vit-mae/);
    }
  });

  it('takes the augmentation settings of Table 1e and the fine-tuning recipe', () => {
    for (const command of ['pretrain', 'finetune', 'linprobe']) {
      const help = run([cli, command, '--help']).stdout.replace(/\s+/g, ' ');
      for (const flag of ['--augment <setting>', '"none", "crop-fixed", "crop", "crop-jitter"', '--crop-fraction <f>', '--rand-augment <spec>', '--reprob <p>']) expect(help, `${command} ${flag}`).toContain(flag);
    }
    expect(run([cli, 'eval', '--help']).stdout).toContain('--crop-fraction <f>');
    const out = join(dir, 'finetune-recipe');
    const recipe = train('finetune', out, ['--augment', 'crop-jitter', '--rand-augment', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--crop-fraction', '0.875', '--eval-data', images]);
    expect(recipe.status, recipe.stderr).toBe(0);
    expect(jsonLines(recipe.stdout).at(-1)).toMatchObject({ type: 'summary', steps: 2, evaluation: { count: 6 } });
    for (const setting of ['none', 'crop-fixed']) expect(train('linprobe', join(dir, `linprobe-${setting}`), ['--augment', setting]).status, setting).toBe(0);
    expect(train('finetune', join(dir, 'bad-setting'), ['--augment', 'jitter']).status).toBe(2);
    const badSpec = train('finetune', join(dir, 'bad-spec'), ['--rand-augment', 'rand-q3']);
    expect(badSpec.status).toBe(1);
    expect(badSpec.stderr).toMatch(/E_ARGUMENT.*bad section 'q3'/);
    const both = train('finetune', join(dir, 'both'), ['--augment', 'none', '--no-crop']);
    expect(both.status).toBe(1);
    expect(both.stderr).toMatch(/--no-crop and --augment/);
  });

  it('finetune writes the model and prints JSON steps and a summary; with --eval-data the summary has an evaluation', async () => {
    const out = join(dir, 'finetune');
    const result = train('finetune', out);
    expect(result.status, result.stderr).toBe(0);
    const events = jsonLines(result.stdout);
    expect(events.filter((e) => e.type === 'step').map((e) => e.step)).toEqual([1, 2]);
    const summary = events.at(-1)!;
    expect(summary).toMatchObject({ type: 'summary', steps: 2, aborted: false, model: join(out, 'model.safetensors') });
    expect(summary.evaluation).toBeUndefined();
    expect(existsSync(join(out, 'model.safetensors'))).toBe(true);
    const clf = await VitClassifier.load(join(out, 'model.safetensors'));
    expect(clf.config).toMatchObject({ numClasses: 2, globalPool: true, headBatchNorm: false, imgSize: 16, inChans: 1 });

    const withEval = join(dir, 'finetune-eval');
    const evaluated = train('finetune', withEval, ['--eval-data', images]);
    expect(evaluated.status, evaluated.stderr).toBe(0);
    const last = jsonLines(evaluated.stdout).at(-1)!;
    expect(last.type).toBe('summary');
    expect(last.evaluation).toMatchObject({ count: 6 });
    expect(last.evaluation.top1).toBeGreaterThanOrEqual(0);
    expect(last.evaluation.top1).toBeLessThanOrEqual(1);
    expect(last.evaluation.top5).toBe(1); // two classes

    // eval of the written model agrees with the run's own evaluation.
    const e = run([cli, 'eval', join(withEval, 'model.safetensors'), '--data', images, '--workers', '1', '--json']);
    expect(e.status, e.stderr).toBe(0);
    const evaluation = JSON.parse(e.stdout);
    expect(evaluation).toMatchObject({ type: 'evaluation', count: 6, top1: last.evaluation.top1, top5: 1 });
    expect(Number.isFinite(evaluation.loss)).toBe(true);
  });

  it('linprobe writes a BatchNorm + linear head model; eval and embed read IDX files with labels', async () => {
    const out = join(dir, 'linprobe');
    const result = run([cli, 'linprobe', mae, '--data', idxImages, '--labels', idxLabels, '--eval-data', idxImages, '--eval-labels', idxLabels,
      '--num-classes', '3', '--epochs', '1', '--warmup-epochs', '0', '--batch-size', '2', '--max-steps', '2', '--workers', '1', '--out', out, '--json']);
    expect(result.status, result.stderr).toBe(0);
    const summary = jsonLines(result.stdout).at(-1)!;
    expect(summary).toMatchObject({ type: 'summary', steps: 2, evaluation: { count: IDX_LABELS.length } });
    const model = join(out, 'model.safetensors');
    const tensors = Object.keys(readSafetensors(model).tensors);
    expect(tensors).toEqual(expect.arrayContaining(['head.0.running_mean', 'head.1.weight', 'norm.weight']));
    expect((await VitClassifier.load(model)).config).toMatchObject({ numClasses: 3, headBatchNorm: true, globalPool: false });

    const e = run([cli, 'eval', model, '--data', idxImages, '--labels', idxLabels, '--workers', '1', '--json']);
    expect(e.status, e.stderr).toBe(0);
    const evaluation = JSON.parse(e.stdout);
    expect(evaluation).toMatchObject({ type: 'evaluation', count: IDX_LABELS.length, top1: summary.evaluation.top1, top5: 1 });

    const file = join(dir, 'idx-embeddings.safetensors');
    const embed = run([cli, 'embed', model, '--data', idxImages, '--labels', idxLabels, '--out', file, '--workers', '1', '--json']);
    expect(embed.status, embed.stderr).toBe(0);
    expect(JSON.parse(embed.stdout)).toMatchObject({ type: 'embeddings', path: file, count: IDX_LABELS.length, dim: 16, labelled: true });
    const written = readSafetensors(file);
    expect(written.tensors.embeddings.shape).toEqual([IDX_LABELS.length, 16]);
    expect(written.ints.labels.data).toEqual(IDX_LABELS);
    expect(written.ints.indices.data).toEqual([...IDX_LABELS.keys()]);
  });

  it('embed writes the embeddings of a classifier or an MAE', async () => {
    const clf = await VitClassifier.fromPretrained(mae, { numClasses: 2 });
    const clfPath = join(dir, 'embed-classifier.safetensors');
    await clf.save(clfPath);
    for (const [checkpoint, name] of [[clfPath, 'classifier'], [mae, 'mae']]) {
      const file = join(dir, `${name}-embeddings.safetensors`);
      const result = run([cli, 'embed', checkpoint, '--data', images, '--out', file, '--batch-size', '4', '--workers', '1', '--json']);
      expect(result.status, `${name}: ${result.stderr}`).toBe(0);
      expect(JSON.parse(result.stdout), name).toMatchObject({ type: 'embeddings', path: file, count: 6, dim: 16, labelled: true });
      const written = readSafetensors(file);
      expect(written.tensors.embeddings.shape, name).toEqual([6, 16]);
      expect(written.ints.indices.data, name).toEqual([0, 1, 2, 3, 4, 5]);
      expect([...written.ints.labels.data].sort(), name).toEqual([0, 0, 0, 1, 1, 1]);
    }
    // The MAE's cls pooling gives other features than its mean pooling.
    const cls = join(dir, 'mae-cls-embeddings.safetensors');
    expect(run([cli, 'embed', mae, '--data', images, '--out', cls, '--pool', 'cls', '--workers', '1', '--json']).status).toBe(0);
    expect(readSafetensors(cls).tensors.embeddings.data).not.toEqual(readSafetensors(join(dir, 'mae-embeddings.safetensors')).tensors.embeddings.data);
  });

  it('info describes a classifier checkpoint: format, tensors, pooling, head and config', async () => {
    const probe = await VitClassifier.fromPretrained(mae, { numClasses: 3, globalPool: false, headBatchNorm: true });
    const path = join(dir, 'info-probe.safetensors');
    await probe.save(path);
    const json = run([cli, 'info', path, '--json']);
    expect(json.status, json.stderr).toBe(0);
    const info = JSON.parse(json.stdout);
    expect(info).toMatchObject({ kind: 'classifier', format: 'safetensors', parameterCount: probe.parameterCount, config: { numClasses: 3, globalPool: false, headBatchNorm: true, embedDim: 16, depth: 1, numHeads: 2, imgSize: 16 } });
    const written = readSafetensors(path);
    expect(Object.keys(info.tensors).sort()).toEqual([...Object.keys(written.tensors), ...Object.keys(written.ints)].sort());
    expect(info.tensors['head.1.weight']).toEqual([3, 16]);
    const text = run([cli, 'info', path]);
    expect(text.status, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/kind: classifier\n/);
    expect(text.stdout).toMatch(/pooling: cls token after norm\n/);
    expect(text.stdout).toMatch(/head: BatchNorm \+ linear \(linear probe\)\n/);
    expect(text.stdout).toMatch(/numClasses: 3\n/);
    // The published fine-tuning layout, as a .pth (whose shapes do not tell the head count).
    const pth = run([cli, 'info', fixture('vit-cls-tiny.pth'), '--json', '--config', '{"numHeads": 3}']);
    expect(pth.status, pth.stderr).toBe(0);
    expect(JSON.parse(pth.stdout)).toMatchObject({ kind: 'classifier', format: 'pth', config: { numClasses: 10, numHeads: 3, globalPool: true, headBatchNorm: false } });
  });

  it('eval and embed stop on SIGINT after the current batch and exit 130', async () => {
    // A model slow enough per image that a pass over the 4,000 images is still going
    // when the first progress line has been read.
    const labels = join(root, 'data', 'fashion-mnist', 'train-labels-idx1-ubyte.gz');
    const slow = MaskedAutoencoder.create({ preset: 'mae_vit_fmnist_patch4_32', seed: 0 });
    const slowMae = join(dir, 'slow-mae.safetensors');
    await slow.save(slowMae);
    const slowClassifier = join(dir, 'slow-classifier.safetensors');
    await (await VitClassifier.fromPretrained(slow, { numClasses: 10 })).save(slowClassifier);
    const embeddings = join(dir, 'interrupted-embeddings.safetensors');
    for (const args of [['eval', slowClassifier, '--labels', labels], ['embed', slowMae, '--out', embeddings]]) {
      const child = spawn(process.execPath, [cli, ...args, '--data', data, '--batch-size', '1', '--workers', '1'], { cwd: root });
      let stderr = '';
      const code = await new Promise<number | null>((resolveExit) => {
        child.stderr.on('data', (chunk: Buffer) => {
          stderr += chunk.toString();
          if (/images \d+\/4000/.test(stderr) && !child.killed) child.kill('SIGINT');
        });
        child.on('exit', (exitCode) => resolveExit(exitCode));
      });
      expect(code, `${args[0]}: ${stderr}`).toBe(130);
      expect(stderr, args[0]).toMatch(/stopped: .*aborted/);
    }
    expect(existsSync(embeddings)).toBe(false);
  });

  it('checks that each command can write its output before any work: E_IO naming the folder, exit 1, no events', () => {
    const file = join(dir, 'plain-file');
    writeFileSync(file, 'not a folder');
    const runs = {
      pretrain: run(pretrainArgs(join(file, 'pretrain'))),
      finetune: train('finetune', join(file, 'finetune')),
      linprobe: train('linprobe', join(file, 'linprobe')),
      embed: run([cli, 'embed', mae, '--data', images, '--out', join(file, 'embed', 'embeddings.safetensors'), '--workers', '1', '--json']),
    };
    for (const [command, result] of Object.entries(runs)) {
      expect(result.status, command).toBe(1);
      expect(result.stderr, command).toMatch(/error \[E_IO\]: cannot write to /);
      expect(result.stderr, command).toContain(join(file, command));
      expect(result.stdout, command).toBe('');
    }
  });

  it('exits 1 with E_CHECKPOINT_KEYS when eval gets an MAE, and 2 on bad usage', () => {
    const notClassifier = run([cli, 'eval', mae, '--data', images, '--json']);
    expect(notClassifier.status).toBe(1);
    expect(notClassifier.stderr).toMatch(/E_CHECKPOINT_KEYS/);
    expect(notClassifier.stdout).toBe('');

    for (const command of ['finetune', 'linprobe']) {
      const missing = run([cli, command, mae, '--data', images, '--out', join(dir, 'never')]);
      expect(missing.status, command).toBe(2);
      expect(missing.stderr, command).toMatch(/--num-classes/);
    }
    expect(existsSync(join(dir, 'never'))).toBe(false);
    expect(run([cli, 'eval', mae]).status).toBe(2); // --data is required
    expect(run([cli, 'finetune', mae, '--data', images, '--num-classes', 'two']).status).toBe(2);
    const missingModel = run([cli, 'eval', join(dir, 'missing.safetensors'), '--data', images]);
    expect(missingModel.status).toBe(1);
    expect(missingModel.stderr).toMatch(/E_CHECKPOINT_NOT_FOUND/);
  });
});
