// The Fashion-MNIST study (issue 7): MAE pre-training of a small ViT, then kNN, linear
// probe and full fine-tuning on the test set, against a randomly initialised encoder and
// a classifier trained from scratch with labels, plus the paper's ablations at this
// scale (mask ratio, decoder depth, norm-pix target, masking strategy). Writes
// docs/results.md, SVG plots and reconstruction grids into docs/results/.
//
//   npm run study                      # the full study (hours on a 2-core CPU), into runs/study and docs/
//   npm run study -- --quick           # a tiny budget end to end (a few minutes), into runs/study-quick
//   npm run study -- --only mae-r75,random-init     # some runs only
//   npm run study -- --report          # only regenerate the results page from finished runs
//
// `pytorch-r75` times the same pre-training recipe in PyTorch eager on this machine
// (examples/study/reference_pretrain.py) with `python3`, or the interpreter
// VIT_MAE_PYTHON names; it is skipped where neither has PyTorch and NumPy.
//
// Resumable: every finished run leaves runs/study/<id>/result.json and is skipped on a
// rerun; training writes checkpoints to runs/study/<id>/checkpoints, and an interrupted
// run (Ctrl-C stops after the current step and checkpoints) continues from the newest.
// Every number on the results page is read from those result.json files.
import { execFileSync } from 'node:child_process';
import { appendFileSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { cpus, totalmem, platform, arch } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  MaskedAutoencoder,
  VitClassifier,
  loadImages,
  writeReconstructionGrid,
  type ClassifierConfig,
  type DatasetSource,
  type MaeConfig,
  type MaskingStrategy,
  type TrainingRun,
  nativeBackend,
} from '../ts/index.js';
import { DECODER_DEPTHS, findings, pathSeconds, RATIOS, scratchShare, SUPERVISED_PAIRS, targets, TIE } from './study/findings.js';
import { readIdxImages, readIdxLabels } from './study/idx.js';
import { knnClassify } from './study/knn.js';
import { linearProbe, type ProbeOptions } from './study/probe.js';
import { lineChart, smooth, type Series } from './study/svg.js';

// ---------------------------------------------------------------------------------------
// Settings

const args = process.argv.slice(2);
function flag(name: string): boolean {
  return args.includes(`--${name}`);
}
function option(name: string): string | undefined {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : undefined;
}
if (flag('help')) {
  console.log('usage: npx tsx examples/study.ts [--quick] [--out DIR] [--docs DIR] [--data DIR] [--only ID,ID] [--device cpu|auto|cuda] [--report]');
  process.exit(0);
}

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const QUICK = flag('quick');
const OUT = option('out') ?? join(ROOT, QUICK ? 'runs/study-quick' : 'runs/study');
const DOCS = option('docs') ?? (QUICK ? join(OUT, 'report') : join(ROOT, 'docs'));
const DEVICE = (option('device') ?? 'cpu') as 'cpu' | 'auto' | 'cuda';
const ONLY = option('only')?.split(',');
const DATA_DIR = option('data') ?? (existsSync('/usr/share/datasets/fashion-mnist') ? '/usr/share/datasets/fashion-mnist' : join(ROOT, 'data/fashion-mnist'));
const PRESET = 'mae_vit_fmnist_patch4_32' as const;

/** The budget: the full study, or a tiny one that tests the pipeline. */
const BUDGET = QUICK
  ? { trainImages: 2000, testImages: 500, pretrainEpochs: 1, ablationEpochs: 1, longEpochs: 2, finetuneEpochs: 1, warmupEpochs: 0.2, batchSize: 128, finetuneBatchSize: 64 }
  : { trainImages: 60000, testImages: 10000, pretrainEpochs: 4, ablationEpochs: 2, longEpochs: 8, finetuneEpochs: 2, warmupEpochs: 1, batchSize: 256, finetuneBatchSize: 128 };

/** The reference recipe of the issue (AdamW, absolute lr 1.5e-3 at batch 256, betas (0.9, 0.95), wd 0.05, warm-up then cosine, flips only). */
const PRETRAIN_RECIPE = { lr: 1.5e-3 * (BUDGET.batchSize / 256), betas: [0.9, 0.95] as [number, number], weightDecay: 0.05, minLr: 0 };
/** Full fine-tuning (and training from scratch): AdamW, warm-up then cosine, drop path 0.1, label smoothing 0.1, flips only. */
const FINETUNE_RECIPE = { lr: 1e-3 * (BUDGET.finetuneBatchSize / 128), minLr: 1e-6, weightDecay: 0.05, dropPath: 0.1, labelSmoothing: 0.1 };
/** Supervised warm-up as a fraction of the schedule: the published fine-tuning recipe's 5 of 100 epochs. */
const FINETUNE_WARMUP_FRACTION = 0.05;
const FINETUNE_LAYER_DECAY = 0.75;
/** The linear probe (examples/study/probe.ts): Adam on standardised features. */
const PROBE: ProbeOptions = { epochs: 30, batchSize: 256, lr: 1e-3, seed: 0 };
const KNN = { k: 20, temperature: 0.07 };
const CHECKPOINT_EVERY = QUICK ? 0 : 50;

/** The reference PyTorch run of the issue (2-core machine, 4 epochs, about 580 s). */
const REFERENCE = { randomInit: { probe: 0.768, knn: 0.714 }, mae: { probe: 0.817, knn: 0.815, seconds: 580 } };

// ---------------------------------------------------------------------------------------
// The runs

interface MaeSettings {
  maskRatio: number;
  masking: MaskingStrategy;
  normPixLoss: boolean;
  decoderDepth: number;
  /** Table 1c: the encoder also takes the removed patches, as a learned mask token. */
  encoderMaskToken: boolean;
  epochs: number;
}

type RunSpec =
  | { id: string; kind: 'random-init'; title: string }
  /** PyTorch eager pre-training with the reference recipe on this machine (examples/study/reference_pretrain.py): training time only. */
  | { id: string; kind: 'pytorch'; title: string; epochs: number }
  | { id: string; kind: 'mae'; title: string; mae: MaeSettings }
  | { id: string; kind: 'finetune'; title: string; from: string; epochs: number }
  /** Trains for as many epochs as fit in the wall-clock of `matches` (pre-training + fine-tuning). */
  | { id: string; kind: 'scratch'; title: string; matches: string };

const BASE: MaeSettings = { maskRatio: 0.75, masking: 'random', normPixLoss: true, decoderDepth: 2, encoderMaskToken: false, epochs: BUDGET.pretrainEpochs };
const mae = (id: string, title: string, over: Partial<MaeSettings>): RunSpec => ({ id, kind: 'mae', title, mae: { ...BASE, ...over } });
/** An ablation: one setting changed from the reference recipe, pre-trained for BUDGET.ablationEpochs. */
const ablation = (id: string, title: string, over: Partial<MaeSettings>): RunSpec => mae(id, `${title}, ${BUDGET.ablationEpochs} epochs`, { epochs: BUDGET.ablationEpochs, ...over });

const RUNS: RunSpec[] = [
  { id: 'random-init', kind: 'random-init', title: 'random-init encoder (no training)' },
  mae('mae-r75', 'MAE, reference recipe (ratio 75%, decoder depth 2, norm-pix, random masking)', {}),
  { id: 'pytorch-r75', kind: 'pytorch', title: 'PyTorch eager, the reference recipe on this machine (wall-clock only)', epochs: BUDGET.pretrainEpochs },
  { id: 'ft-mae-r75', kind: 'finetune', title: 'MAE (mae-r75) + full fine-tuning', from: 'mae-r75', epochs: BUDGET.finetuneEpochs },
  { id: 'scratch', kind: 'scratch', title: 'supervised from scratch, the wall-clock of mae-r75 + ft-mae-r75', matches: 'ft-mae-r75' },
  ablation('abl-r75', 'reference recipe (the ablations\' baseline)', {}),
  ablation('abl-r25', 'mask ratio 25%', { maskRatio: 0.25 }),
  ablation('abl-r50', 'mask ratio 50%', { maskRatio: 0.5 }),
  ablation('abl-r90', 'mask ratio 90%', { maskRatio: 0.9 }),
  ablation('abl-dec1', 'decoder depth 1', { decoderDepth: 1 }),
  ablation('abl-dec4', 'decoder depth 4', { decoderDepth: 4 }),
  ablation('abl-raw', 'raw-pixel target (no norm-pix)', { normPixLoss: false }),
  ablation('abl-block', 'block masking', { masking: 'block' }),
  ablation('abl-grid', 'grid masking', { masking: 'grid' }),
  ablation('abl-encoder-mask-token', 'encoder with mask tokens', { encoderMaskToken: true }),
  mae('mae-r75-long', `reference recipe, ${BUDGET.longEpochs} epochs`, { epochs: BUDGET.longEpochs }),
  { id: 'ft-mae-r75-long', kind: 'finetune', title: 'MAE (mae-r75-long) + full fine-tuning', from: 'mae-r75-long', epochs: BUDGET.finetuneEpochs },
  { id: 'scratch-long', kind: 'scratch', title: 'supervised from scratch, the wall-clock of mae-r75-long + ft-mae-r75-long', matches: 'ft-mae-r75-long' },
];

// ---------------------------------------------------------------------------------------
// Data

function git(...a: string[]): string {
  try {
    return execFileSync('git', a, { cwd: ROOT, encoding: 'utf8' }).trim();
  } catch {
    return 'unknown';
  }
}
const COMMIT = git('rev-parse', '--short', 'HEAD');
const DIRTY = git('status', '--porcelain') !== '';

const files = {
  trainImages: join(DATA_DIR, 'train-images-idx3-ubyte.gz'),
  trainLabels: join(DATA_DIR, 'train-labels-idx1-ubyte.gz'),
  testImages: join(DATA_DIR, 't10k-images-idx3-ubyte.gz'),
  testLabels: join(DATA_DIR, 't10k-labels-idx1-ubyte.gz'),
};

interface Data {
  /** Training images without labels (pre-training). */
  pretrain: DatasetSource;
  /** Training images with labels (probe, kNN, fine-tuning). */
  train: DatasetSource;
  test: DatasetSource;
  trainCount: number;
  testCount: number;
  /** The training set's pixel mean and std (in [0, 1] units), for normalisation. */
  mean: number;
  std: number;
}

function memorySource(images: Uint8Array, labels: Uint8Array | undefined, count: number, side: number): DatasetSource {
  const data = new Float32Array(count * side * side);
  for (let i = 0; i < data.length; i++) data[i] = images[i] / 255;
  return { kind: 'memory', images: { data, shape: [count, 1, side, side] }, labels: labels ? Array.from(labels.subarray(0, count)) : undefined };
}

function loadData(): Data {
  const train = readIdxImages(files.trainImages);
  const trainLabels = readIdxLabels(files.trainLabels);
  const test = readIdxImages(files.testImages);
  const testLabels = readIdxLabels(files.testLabels);
  const trainCount = Math.min(BUDGET.trainImages, train.count);
  const testCount = Math.min(BUDGET.testImages, test.count);
  let sum = 0;
  let sq = 0;
  const n = trainCount * train.rows * train.cols;
  for (let i = 0; i < n; i++) {
    const v = train.data[i] / 255;
    sum += v;
    sq += v * v;
  }
  const mean = sum / n;
  const std = Math.sqrt(sq / n - mean * mean);
  const whole = trainCount === train.count && testCount === test.count;
  if (whole) {
    return {
      pretrain: { kind: 'idx', path: files.trainImages },
      train: { kind: 'idx', path: files.trainImages, labelsPath: files.trainLabels },
      test: { kind: 'idx', path: files.testImages, labelsPath: files.testLabels },
      trainCount,
      testCount,
      mean,
      std,
    };
  }
  return {
    pretrain: memorySource(train.data, undefined, trainCount, train.rows),
    train: memorySource(train.data, trainLabels, trainCount, train.rows),
    test: memorySource(test.data, testLabels, testCount, test.rows),
    trainCount,
    testCount,
    mean,
    std,
  };
}

// ---------------------------------------------------------------------------------------
// Results on disk

interface CurvePoint {
  step: number;
  epoch: number;
  loss: number;
  lr: number;
  /** Seconds of training so far (across resumes). */
  t: number;
}

interface Evaluation {
  probe: number;
  probeTrain: number;
  knnWeighted: number;
  knnMajority: number;
  embedSeconds: number;
  knnSeconds: number;
  probeSeconds: number;
}

interface Training {
  epochs: number;
  steps: number;
  imagesSeen: number;
  batchSize: number;
  /** Wall-clock seconds of training (summed over resumes; evaluation excluded). */
  seconds: number;
  imagesPerSec: number;
  finalLoss: number;
  /** Mean loss of the last epoch. */
  lastEpochLoss: number | null;
  resumed: boolean;
}

interface Result {
  id: string;
  kind: RunSpec['kind'];
  title: string;
  commit: string;
  dirty: boolean;
  finishedAt: string;
  device: string;
  trainImages: number;
  testImages: number;
  mae?: MaeSettings & { config: MaeConfig };
  training?: Training;
  evaluation?: Evaluation;
  /** Fine-tuning / from scratch: test accuracy after training. */
  test?: { top1: number; top5: number; loss: number; seconds: number };
  /** `pytorch`: the interpreter's PyTorch version and threads. */
  pytorch?: { torch: string; threads: number };
  /** Fine-tuning: the pre-training run it started from and its seconds (for the total budget). */
  from?: { id: string; seconds: number; epochs: number };
  reconstruction?: string;
}

const runDir = (id: string) => join(OUT, id);
const resultPath = (id: string) => join(runDir(id), 'result.json');

function readResult(id: string): Result | null {
  const p = resultPath(id);
  return existsSync(p) ? (JSON.parse(readFileSync(p, 'utf8')) as Result) : null;
}

function readCurve(id: string): CurvePoint[] {
  const p = join(runDir(id), 'curve.jsonl');
  if (!existsSync(p)) return [];
  return readFileSync(p, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as CurvePoint);
}

/** The newest checkpoint in a folder and the steps it holds, from its name (checkpoint-NNNNNNNN.safetensors). */
function newestCheckpoint(dir: string): { path: string; step: number } | null {
  if (!existsSync(dir)) return null;
  const found = readdirSync(dir)
    .map((f) => /^checkpoint-(\d+)\.safetensors$/.exec(f))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => ({ path: join(dir, m[0]), step: Number(m[1]) }))
    .sort((a, b) => b.step - a.step);
  return found[0] ?? null;
}

const controller = new AbortController();
let interrupted = false;
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.on(sig, () => {
    if (interrupted) process.exit(130);
    interrupted = true;
    console.log(`\n${sig}: stopping after the current step (a checkpoint is written); rerun to resume`);
    controller.abort();
  });
}

/**
 * Runs a training run to its end, appending its step events to <dir>/curve.jsonl
 * (cut back to the checkpoint it resumes from) and timing it across resumes.
 */
async function train(id: string, start: (resume: string | undefined) => TrainingRun, epochs: number, batchSize: number): Promise<Training> {
  const dir = runDir(id);
  const checkpoint = newestCheckpoint(join(dir, 'checkpoints'));
  const curvePath = join(dir, 'curve.jsonl');
  const prior = checkpoint ? readCurve(id).filter((p) => p.step <= checkpoint.step) : [];
  writeFileSync(curvePath, prior.map((p) => JSON.stringify(p) + '\n').join(''));
  const base = prior.length ? prior[prior.length - 1].t : 0;
  if (checkpoint) console.log(`  resuming from ${relative(ROOT, checkpoint.path)} (step ${checkpoint.step}, ${base.toFixed(0)} s done)`);
  const started = performance.now();
  const run = start(checkpoint?.path);
  let lastEpochLoss: number | null = null;
  let lastPrint = 0;
  for await (const e of run) {
    if (e.type === 'step') {
      const t = base + (performance.now() - started) / 1000;
      appendFileSync(curvePath, JSON.stringify({ step: e.step, epoch: e.epoch, loss: e.loss, lr: e.lr, t }) + '\n');
      if (performance.now() - lastPrint > 10_000 || e.step === e.totalSteps) {
        lastPrint = performance.now();
        console.log(`  step ${e.step}/${e.totalSteps} epoch ${e.epoch} loss ${e.loss.toFixed(4)} lr ${e.lr.toExponential(2)} ${e.imagesPerSec.toFixed(0)} img/s eta ${e.etaSeconds.toFixed(0)} s`);
      }
    } else if (e.type === 'epochEnd') {
      lastEpochLoss = e.meanLoss;
      console.log(`  epoch ${e.epoch} done, mean loss ${e.meanLoss.toFixed(4)}`);
    } else if (e.type === 'skipped') {
      console.log(`  skipped ${e.count} images: ${e.message}`);
    }
  }
  const summary = await run.result;
  if (summary.aborted) {
    console.log(`  ${id} stopped at step ${summary.steps}; checkpoint ${summary.lastCheckpoint}`);
    process.exit(130);
  }
  const curve = readCurve(id);
  const seconds = base + summary.seconds;
  return {
    epochs,
    steps: summary.steps,
    imagesSeen: summary.imagesSeen,
    batchSize,
    seconds,
    imagesPerSec: summary.imagesSeen / seconds,
    finalLoss: summary.finalLoss,
    lastEpochLoss: lastEpochLoss ?? (curve.length ? curve.filter((p) => p.epoch === curve[curve.length - 1].epoch).reduce((s, p, _, a) => s + p.loss / a.length, 0) : null),
    resumed: checkpoint !== null,
  };
}

async function evaluateEncoder(model: MaskedAutoencoder, data: Data): Promise<Evaluation> {
  const augment = { padTo: 32, mean: [data.mean], std: [data.std] };
  const t0 = performance.now();
  const tr = await model.embedDataset(data.train, { pool: 'mean', augment, batchSize: 256, signal: controller.signal });
  const te = await model.embedDataset(data.test, { pool: 'mean', augment, batchSize: 256, signal: controller.signal });
  const embedSeconds = (performance.now() - t0) / 1000;
  const dim = tr.features.shape[1];
  console.log(`  embedded ${tr.features.shape[0]} + ${te.features.shape[0]} images (${dim}-d) in ${embedSeconds.toFixed(1)} s`);
  const knn = knnClassify(tr.features.data, tr.labels!, te.features.data, te.labels!, dim, KNN);
  console.log(`  kNN (k=${KNN.k}, cosine): weighted ${(knn.weighted * 100).toFixed(2)}%, majority ${(knn.majority * 100).toFixed(2)}% (${knn.seconds.toFixed(1)} s)`);
  const probe = linearProbe(tr.features.data, tr.labels!, te.features.data, te.labels!, dim, PROBE);
  console.log(`  linear probe: test ${(probe.accuracy * 100).toFixed(2)}%, train ${(probe.trainAccuracy * 100).toFixed(2)}% (${probe.seconds.toFixed(1)} s)`);
  return {
    probe: probe.accuracy,
    probeTrain: probe.trainAccuracy,
    knnWeighted: knn.weighted,
    knnMajority: knn.majority,
    embedSeconds,
    knnSeconds: knn.seconds,
    probeSeconds: probe.seconds,
  };
}

function header(spec: RunSpec, data: Data, device: string): Omit<Result, 'finishedAt'> {
  return { id: spec.id, kind: spec.kind, title: spec.title, commit: COMMIT, dirty: DIRTY, device, trainImages: data.trainCount, testImages: data.testCount };
}

function save(result: Omit<Result, 'finishedAt'>): void {
  writeFileSync(resultPath(result.id), JSON.stringify({ ...result, finishedAt: new Date().toISOString() }, null, 2) + '\n');
}

function classifierConfig(): Partial<ClassifierConfig> {
  const c = MaskedAutoencoder.presets()[PRESET];
  return {
    imgSize: c.imgSize, patchSize: c.patchSize, inChans: c.inChans, embedDim: c.embedDim, depth: c.depth, numHeads: c.numHeads,
    mlpRatio: c.mlpRatio, layerNormEps: c.layerNormEps, numClasses: 10, globalPool: true, headBatchNorm: false,
  };
}

/** What every training run of the study shares: seed, checkpoints, resume, cancellation. */
function runOptions(dir: string, resume: string | undefined) {
  return { seed: 0, checkpointDir: join(dir, 'checkpoints'), checkpointEvery: CHECKPOINT_EVERY, keepLast: 2, resume, signal: controller.signal };
}

async function runOne(spec: RunSpec, data: Data): Promise<void> {
  const dir = runDir(spec.id);
  mkdirSync(dir, { recursive: true });
  const augment = { padTo: 32, randomResizedCrop: false, hflip: true, mean: [data.mean], std: [data.std] };
  const passAugment = { padTo: 32, mean: [data.mean], std: [data.std] };

  if (spec.kind === 'random-init') {
    const model = MaskedAutoencoder.create({ preset: PRESET, seed: 0, device: DEVICE });
    save({ ...header(spec, data, model.device), evaluation: await evaluateEncoder(model, data) });
    return;
  }

  if (spec.kind === 'pytorch') {
    const python = process.env.VIT_MAE_PYTHON ?? 'python3';
    const script = join(ROOT, 'examples/study/reference_pretrain.py');
    const threads = String(cpus().length);
    // --quick: a few steps, as a test of the script.
    const args = [script, files.trainImages, String(spec.epochs), threads, String(BUDGET.batchSize), ...(QUICK ? ['15'] : [])];
    let line: string;
    try {
      execFileSync(python, ['-c', 'import torch, numpy'], { stdio: 'ignore' });
      line = execFileSync(python, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] }).trim().split('\n').pop()!;
    } catch (e) {
      console.log(`  skipped: ${python} with PyTorch and NumPy is needed (VIT_MAE_PYTHON names another interpreter): ${(e as Error).message.split('\n')[0]}`);
      return;
    }
    const r = JSON.parse(line) as { seconds: number; imagesPerSec: number; steps: number; batchSize: number; finalLoss: number; threads: number; torch: string };
    console.log(`  PyTorch ${r.torch}: ${r.steps} steps in ${r.seconds.toFixed(1)} s (${r.imagesPerSec.toFixed(0)} img/s), final loss ${r.finalLoss.toFixed(4)}`);
    const training: Training = { epochs: spec.epochs, steps: r.steps, imagesSeen: r.steps * r.batchSize, batchSize: r.batchSize, seconds: r.seconds, imagesPerSec: r.imagesPerSec, finalLoss: r.finalLoss, lastEpochLoss: null, resumed: false };
    save({ ...header(spec, data, 'cpu'), training, pytorch: { torch: r.torch, threads: r.threads } });
    return;
  }

  if (spec.kind === 'mae') {
    const s = spec.mae;
    const modelPath = join(dir, 'model.safetensors');
    let model: MaskedAutoencoder;
    let training: Training;
    if (existsSync(modelPath) && existsSync(join(dir, 'training.json'))) {
      // Pre-training finished before; only the evaluation is left.
      model = await MaskedAutoencoder.load(modelPath, { device: DEVICE });
      training = JSON.parse(readFileSync(join(dir, 'training.json'), 'utf8')) as Training;
    } else {
      model = MaskedAutoencoder.create({ preset: PRESET, config: { decoderDepth: s.decoderDepth, normPixLoss: s.normPixLoss, encoderMaskToken: s.encoderMaskToken }, seed: 0, device: DEVICE });
      training = await train(
        spec.id,
        (resume) =>
          model.pretrain({
            data: data.pretrain,
            augment,
            epochs: s.epochs,
            warmupEpochs: BUDGET.warmupEpochs,
            batchSize: BUDGET.batchSize,
            ...PRETRAIN_RECIPE,
            maskRatio: s.maskRatio,
            masking: s.masking,
            ...runOptions(dir, resume),
          }),
        s.epochs,
        BUDGET.batchSize,
      );
      await model.save(modelPath);
      writeFileSync(join(dir, 'training.json'), JSON.stringify(training, null, 2) + '\n');
    }
    console.log(`  pre-trained ${training.epochs} epochs, ${training.steps} steps in ${training.seconds.toFixed(1)} s (${training.imagesPerSec.toFixed(0)} img/s), final loss ${training.finalLoss.toFixed(4)}`);
    const evaluation = await evaluateEncoder(model, data);
    const images = await loadImages(data.test, { imgSize: 32, inChans: 1, count: 8, augment: passAugment });
    const rec = await model.reconstruct(images, { maskRatio: s.maskRatio, masking: s.masking });
    await writeReconstructionGrid(join(dir, 'reconstruction.png'), rec, images, { mean: [data.mean], std: [data.std] });
    save({ ...header(spec, data, model.device), mae: { ...s, config: { ...model.config } }, training, evaluation, reconstruction: 'reconstruction.png' });
    return;
  }

  // Fine-tuning from a pre-trained MAE, or the same classifier from scratch.
  let clf: VitClassifier;
  let from: Result['from'];
  let layerDecay: number;
  let epochs: number;
  if (spec.kind === 'finetune') {
    const source = readResult(spec.from);
    if (!source?.training) {
      console.log(`  skipped: needs the finished pre-training run ${spec.from}`);
      return;
    }
    clf = await VitClassifier.fromPretrained(join(runDir(spec.from), 'model.safetensors'), { numClasses: 10, seed: 0, device: DEVICE });
    from = { id: spec.from, seconds: source.training.seconds, epochs: source.training.epochs };
    layerDecay = FINETUNE_LAYER_DECAY;
    epochs = spec.epochs;
  } else {
    const matched = readResult(spec.matches);
    if (!matched?.training || !matched.from) {
      console.log(`  skipped: needs the finished run ${spec.matches}`);
      return;
    }
    // Supervised epochs cost the same here as in fine-tuning: as many as fit in the
    // MAE path's pre-training + fine-tuning seconds, the last one ended early (to
    // the nearest step) where the budget runs out.
    const perEpoch = matched.training.seconds / matched.training.epochs;
    const budget = pathSeconds(matched);
    epochs = Math.round((budget / perEpoch) * 100) / 100;
    console.log(`  ${epochs} epochs: ${budget.toFixed(0)} s of ${spec.matches} at ${perEpoch.toFixed(0)} s per supervised epoch`);
    clf = VitClassifier.create(classifierConfig(), { seed: 0, device: DEVICE });
    layerDecay = 1;
  }
  const training = await train(
    spec.id,
    (resume) =>
      clf.finetune({
        data: data.train,
        augment,
        protocol: 'finetune',
        epochs,
        warmupEpochs: epochs * FINETUNE_WARMUP_FRACTION,
        batchSize: BUDGET.finetuneBatchSize,
        ...FINETUNE_RECIPE,
        layerDecay,
        ...runOptions(dir, resume),
      }),
    epochs,
    BUDGET.finetuneBatchSize,
  );
  const t0 = performance.now();
  const ev = await clf.evaluate(data.test, { augment: passAugment, batchSize: 256, signal: controller.signal });
  const test = { top1: ev.top1, top5: ev.top5, loss: ev.loss, seconds: (performance.now() - t0) / 1000 };
  console.log(`  trained ${training.epochs} epochs in ${training.seconds.toFixed(1)} s; test top-1 ${(ev.top1 * 100).toFixed(2)}%`);
  save({ ...header(spec, data, clf.device), training, test, from });
}

// ---------------------------------------------------------------------------------------
// The results page

const pct = (v: number | undefined) => (v === undefined ? '–' : `${(v * 100).toFixed(1)}%`);
const secs = (v: number | undefined) => (v === undefined ? '–' : v.toFixed(0));
const NOT_RUN = 'not run yet';

function table(head: string[], rows: string[][]): string {
  return [`| ${head.join(' | ')} |`, `| ${head.map(() => '---').join(' | ')} |`, ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
}

function maeRows(ids: { id: string; setting: string }[], results: Map<string, Result>): string {
  return table(
    ['Run', 'Setting', 'Epochs', 'Steps (batch)', 'Pre-training (s)', 'Images/s', 'Final loss', 'Linear probe', 'kNN (weighted)', 'kNN (majority)'],
    ids.map(({ id, setting }) => {
      const r = results.get(id);
      if (!r?.training || !r.evaluation) return [`\`${id}\``, setting, NOT_RUN, '', '', '', '', '', '', ''];
      const t = r.training;
      const e = r.evaluation;
      return [`\`${id}\``, setting, String(t.epochs), `${t.steps} (${t.batchSize})`, secs(t.seconds), t.imagesPerSec.toFixed(0), t.finalLoss.toFixed(4), pct(e.probe), pct(e.knnWeighted), pct(e.knnMajority)];
    }),
  );
}

function lossChart(title: string, ids: { id: string; setting: string }[], results: Map<string, Result>, file: string, resultsDir: string): string {
  const series: Series[] = ids
    .filter(({ id }) => results.get(id)?.training)
    .map(({ id, setting }) => {
      const curve = readCurve(id);
      const perEpoch = curve.length / Math.max(1, results.get(id)!.training!.epochs);
      const pts = curve.map((p) => [p.step / Math.max(1, perEpoch), p.loss] as [number, number]);
      return { label: setting, points: smooth(pts, Math.max(1, Math.round(curve.length / 60))) };
    });
  if (!series.length) return '';
  writeFileSync(join(resultsDir, file), lineChart({ title, xLabel: 'epoch', yLabel: 'training loss (moving average)', series }));
  return `![${title}](results/${file})\n`;
}

function machine(): string {
  const c = cpus();
  const backend = nativeBackend();
  return `${c.length} x ${c[0]?.model ?? 'unknown CPU'}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, ${platform()} ${arch()}, Node ${process.version}, ${backend.cuda ? 'CUDA' : 'CPU'} addon`;
}

function writeReport(data: Data): void {
  const results = new Map<string, Result>();
  for (const spec of RUNS) {
    const r = readResult(spec.id);
    if (r) results.set(spec.id, r);
  }
  const resultsDir = join(DOCS, 'results');
  mkdirSync(resultsDir, { recursive: true });
  const commits = [...new Set([...results.values()].map((r) => `${r.commit}${r.dirty ? ' (dirty)' : ''}`))];
  const devices = [...new Set([...results.values()].map((r) => r.device))];
  const out: string[] = [];
  const w = (s = '') => out.push(s);

  w('# Fashion-MNIST study: MAE at small scale');
  w();
  w(`Generated by \`npm run study${QUICK ? ' -- --quick' : ''}\` ([\`examples/study.ts\`](${relative(DOCS, join(ROOT, 'examples/study.ts'))})); do not edit by hand. Every number below is read`);
  w(`from the runs' \`result.json\` files (in \`${relative(ROOT, OUT) || OUT}\`).`);
  w();
  w(`- Page written at commit \`${COMMIT}\`${DIRTY ? ' (**dirty** working tree)' : ''} on ${new Date().toISOString().slice(0, 10)}; runs from commit(s) ${commits.map((c) => `\`${c}\``).join(', ') || '–'}.`);
  w(`- Machine: ${machine()}; device(s) ${devices.join(', ') || '–'}.`);
  w(`- Data: Fashion-MNIST from \`${DATA_DIR}\`, ${data.trainCount.toLocaleString('en')} training images (pre-training ignores their labels), ${data.testCount.toLocaleString('en')} test images${QUICK ? ' (**--quick budget: a pipeline test, not results**)' : ''}.`);
  w(`- Input: 28x28 zero-padded to 32x32 (background value 0), normalised with the training set's mean ${data.mean.toFixed(4)} and std ${data.std.toFixed(4)}; horizontal flips only, no random-resized crop.`);
  const c = MaskedAutoencoder.presets()[PRESET];
  w(`- Model: \`${PRESET}\`: ViT ${c.embedDim}-d x ${c.depth} blocks x ${c.numHeads} heads, patch ${c.patchSize} on ${c.imgSize}x${c.imgSize}, decoder ${c.decoderEmbedDim}-d x ${c.decoderDepth} x ${c.decoderNumHeads} (ablations change one setting each).`);
  w(`- Pre-training: batch ${BUDGET.batchSize}, AdamW lr ${PRETRAIN_RECIPE.lr} (absolute), betas (${PRETRAIN_RECIPE.betas.join(', ')}), weight decay ${PRETRAIN_RECIPE.weightDecay}, ${BUDGET.warmupEpochs} warm-up epoch(s) then half-cycle cosine to ${PRETRAIN_RECIPE.minLr}, seed 0.`);
  w(`- kNN: k = ${KNN.k}, cosine similarity on the mean-pooled patch tokens (after the encoder's final norm) of the unmasked image; *weighted* = each neighbour votes exp(similarity / ${KNN.temperature}) (the DINO / MAE-repository monitor), *majority* = one vote each (ties to the nearest neighbour's class). Training images are the neighbours, test images the queries.`);
  w(`- Linear probe: the same features standardised with the training set's per-dimension mean and std, multinomial logistic regression (weights + bias) trained with Adam (lr ${PROBE.lr}, betas 0.9/0.999, no weight decay, constant lr) for ${PROBE.epochs} epochs of batch ${PROBE.batchSize}, seed ${PROBE.seed}; test accuracy after the last epoch (no model selection on the test set).`);
  w(`- Fine-tuning and from scratch: \`VitClassifier\` (mean-pooled tokens, \`fc_norm\`, linear head), AdamW lr ${FINETUNE_RECIPE.lr} at batch ${BUDGET.finetuneBatchSize}, betas (0.9, 0.999), weight decay ${FINETUNE_RECIPE.weightDecay}, warm-up over the first ${FINETUNE_WARMUP_FRACTION * 100}% of the steps (the published recipe's 5 of 100 epochs) then cosine to ${FINETUNE_RECIPE.minLr}, drop path ${FINETUNE_RECIPE.dropPath}, label smoothing ${FINETUNE_RECIPE.labelSmoothing}, layer decay ${FINETUNE_LAYER_DECAY} (fine-tuning) or 1 (from scratch), flips only; evaluated once on the test set at the end.`);
  w(`- Budgets: \`mae-r75\` ${BUDGET.pretrainEpochs} epochs (the reference recipe), \`mae-r75-long\` ${BUDGET.longEpochs}, every ablation (\`abl-*\`, against its own baseline \`abl-r75\`) ${BUDGET.ablationEpochs}; fine-tuning ${BUDGET.finetuneEpochs} epochs.`);
  w('- Wall-clock: seconds of training only (loading, evaluation and checkpoints at the end excluded), summed over resumes.');
  for (const c of new Set([...results.values()].map((r) => r.commit))) {
    if (c === COMMIT) continue;
    const changed = git('diff', '--name-only', c, 'HEAD', '--', '.', ':(exclude)docs').split('\n').filter(Boolean);
    w(`- Files changed between the runs' commit \`${c}\` and this page's: ${changed.length ? changed.map((f) => `\`${f}\``).join(', ') : 'none outside docs/'}.`);
  }
  w();

  w('## Targets');
  w();
  w(table(['Target (issue 7)', 'Here', 'Met'], targets(results, REFERENCE.mae).map((t) => [t.target, t.here, t.met === 'yes' ? 'yes' : `**${t.met}**`])));
  w();
  const ptSeconds = results.get('pytorch-r75')?.training?.seconds;
  w(`The reference run's wall-clock comes from another 2-core machine, so the study times PyTorch on this one beside vit-mae (\`pytorch-r75\`, the same recipe in PyTorch eager): that ratio, not the absolute seconds, says which is faster.${ptSeconds ? ` PyTorch itself needs ${(ptSeconds / REFERENCE.mae.seconds).toFixed(2)}x the reference run's ${REFERENCE.mae.seconds} s here.` : ''}`);
  w();
  w('## The paper\'s findings at this scale');
  w();
  const found = findings(results);
  w(table(['Finding (He et al. 2021)', 'Paper', 'Here', 'Reproduces'], found.map((f) => [f.claim, f.paper, f.here, f.verdict === 'yes' ? 'yes' : `**${f.verdict}**`])));
  w();
  w(`Differences under ${(TIE * 100).toFixed(1)} points of accuracy count as ties: each run has one seed, and one standard error of an accuracy near 85% on 10,000 test images is 0.36 points.`);
  w();
  for (const f of found.filter((f) => f.why)) w(`- **${f.claim}** (${f.verdict}): ${f.why}`);
  w();

  // 1. MAE vs random init
  w('## MAE pre-training against a randomly initialised encoder');
  w();
  const ri = results.get('random-init');
  const m = results.get('mae-r75');
  const long = results.get('mae-r75-long');
  const pt = results.get('pytorch-r75');
  const mainRows: string[][] = [
    ['random-init encoder (`random-init`)', '0', '–', ri?.evaluation ? pct(ri.evaluation.probe) : NOT_RUN, pct(ri?.evaluation?.knnWeighted), pct(ri?.evaluation?.knnMajority), `${pct(REFERENCE.randomInit.probe)} / ${pct(REFERENCE.randomInit.knn)}`],
    ['MAE, reference recipe (`mae-r75`)', m?.training ? String(m.training.epochs) : String(BUDGET.pretrainEpochs), secs(m?.training?.seconds), m?.evaluation ? pct(m.evaluation.probe) : NOT_RUN, pct(m?.evaluation?.knnWeighted), pct(m?.evaluation?.knnMajority), `${pct(REFERENCE.mae.probe)} / ${pct(REFERENCE.mae.knn)} in ${REFERENCE.mae.seconds} s`],
    [
      'PyTorch eager, same recipe, this machine (`pytorch-r75`)',
      pt?.training ? String(pt.training.epochs) : String(BUDGET.pretrainEpochs),
      pt?.training ? `${secs(pt.training.seconds)}${m?.training ? ` (vit-mae: ${(m.training.seconds / pt.training.seconds).toFixed(2)}x the time)` : ''}` : NOT_RUN,
      '–', '–', '–', `PyTorch ${pt?.pytorch?.torch ?? ''}`,
    ],
    [`MAE, longer (\`mae-r75-long\`)`, long?.training ? String(long.training.epochs) : String(BUDGET.longEpochs), secs(long?.training?.seconds), long?.evaluation ? pct(long.evaluation.probe) : NOT_RUN, pct(long?.evaluation?.knnWeighted), pct(long?.evaluation?.knnMajority), '–'],
  ];
  w(table(['Encoder', 'Pre-training epochs', 'Pre-training (s)', 'Linear probe', 'kNN (weighted)', 'kNN (majority)', 'Reference PyTorch (probe / kNN)'], mainRows));
  w();
  w(`The reference PyTorch run (issue 7): the same recipe, 4 epochs on another 2-core machine, about ${REFERENCE.mae.seconds} s of training. \`pytorch-r75\` times the same recipe in PyTorch eager (examples/study/reference_pretrain.py, the model of bench/reference.py) on this machine, training only; its accuracy is not measured here.`);
  w();

  // 2. Fine-tuning vs scratch
  w('## Fine-tuning against supervised training from scratch');
  w();
  const supervisedRows: string[][] = [];
  const budgets: string[] = [];
  for (const pair of SUPERVISED_PAIRS) {
    const ft = results.get(pair.ft);
    const sc = results.get(pair.scratch);
    supervisedRows.push(
      ft?.training && ft.test && ft.from
        ? [`MAE + fine-tuning (\`${pair.ft}\`)`, `${ft.from.epochs} + ${ft.training.epochs}`, secs(ft.from.seconds), secs(ft.training.seconds), secs(pathSeconds(ft)), pct(ft.test.top1), pct(ft.test.top5)]
        : [`MAE + fine-tuning (\`${pair.ft}\`)`, NOT_RUN, '', '', '', '', ''],
      sc?.training && sc.test
        ? [`from scratch (\`${pair.scratch}\`)`, `0 + ${sc.training.epochs}`, '0', secs(sc.training.seconds), secs(sc.training.seconds), pct(sc.test.top1), pct(sc.test.top5)]
        : [`from scratch (\`${pair.scratch}\`)`, NOT_RUN, '', '', '', '', ''],
    );
    if (ft?.training && ft.from && sc?.training) {
      budgets.push(`\`${pair.scratch}\` trained ${secs(sc.training.seconds)} s against the ${secs(pathSeconds(ft))} s of \`${pair.ft}\`'s path (${scratchShare(ft, sc)})`);
    }
  }
  w(table(['Run', 'Epochs (pre-train + supervised)', 'Pre-training (s)', 'Supervised training (s)', 'Total (s)', 'Test top-1', 'Test top-5'], supervisedRows));
  w();
  w(`The same total budget in wall-clock: from scratch trains for as many supervised epochs as fit in the seconds the MAE path took (pre-training plus fine-tuning) at the fine-tuning run's seconds per epoch, to two decimals (its cosine schedule ends there, at the nearest step)${budgets.length ? `: ${budgets.join('; ')}` : ''}.`);
  w();
  const supervisedIds = SUPERVISED_PAIRS.flatMap((pair) => [
    { id: pair.ft, setting: `MAE + fine-tuning (${pair.ft})` },
    { id: pair.scratch, setting: `from scratch (${pair.scratch})` },
  ]);
  w(lossChart('Supervised training loss (label-smoothed)', supervisedIds, results, 'loss-supervised.svg', resultsDir));

  // 3. Mask ratio
  const ratioIds = RATIOS.map(({ id, ratio }) => ({ id, setting: `${ratio}%`, ratio }));
  w('## Mask ratio (the paper\'s Figure 5)');
  w();
  w(maeRows(ratioIds, results));
  w();
  const ratioPts = (key: 'probe' | 'knnWeighted') => ratioIds.filter(({ id }) => results.get(id)?.evaluation).map(({ id, ratio }) => [ratio, results.get(id)!.evaluation![key] * 100] as [number, number]);
  if (ratioPts('probe').length) {
    writeFileSync(
      join(resultsDir, 'accuracy-vs-mask-ratio.svg'),
      lineChart({ title: 'Accuracy against mask ratio', xLabel: 'mask ratio (%)', yLabel: 'test accuracy (%)', series: [{ label: 'linear probe', points: ratioPts('probe'), markers: true }, { label: 'kNN (weighted)', points: ratioPts('knnWeighted'), markers: true }] }),
    );
    w('![Accuracy against mask ratio](results/accuracy-vs-mask-ratio.svg)');
    w();
  }
  w(lossChart('Pre-training loss by mask ratio', ratioIds, results, 'loss-mask-ratio.svg', resultsDir));

  // 4. Decoder depth
  const decIds = DECODER_DEPTHS.map(({ id, depth }) => ({ id, setting: `depth ${depth}` }));
  w('## Decoder depth (Table 1a)');
  w();
  w(maeRows(decIds, results));
  w();
  w(lossChart('Pre-training loss by decoder depth', decIds, results, 'loss-decoder-depth.svg', resultsDir));

  // 5. Target
  const targetIds = [{ id: 'abl-r75', setting: 'norm-pix' }, { id: 'abl-raw', setting: 'raw pixels' }];
  w('## Reconstruction target (Table 1d)');
  w();
  w(maeRows(targetIds, results));
  w();
  w('The two losses are on different scales (per-patch normalised pixels against normalised pixels), so only the accuracies compare.');
  w();

  // 6. Masking
  const maskIds = [{ id: 'abl-r75', setting: 'random', masking: 'random' }, { id: 'abl-block', setting: 'block', masking: 'block' }, { id: 'abl-grid', setting: 'grid', masking: 'grid' }];
  w('## Masking strategy (Table 1f), ratio 75%');
  w();
  w(maeRows(maskIds, results));
  w();
  w(lossChart('Pre-training loss by masking strategy', maskIds, results, 'loss-masking.svg', resultsDir));
  for (const { id, masking } of maskIds) {
    const r = results.get(id);
    if (!r?.reconstruction) continue;
    const file = `reconstruction-${masking}.png`;
    copyFileSync(join(runDir(id), r.reconstruction), join(resultsDir, file));
    w(`**${masking}** (\`${id}\`, test images; columns: masked, reconstruction, reconstruction + visible patches, original):`);
    w();
    w(`![${masking} masking reconstruction](results/${file})`);
    w();
  }

  // 7. Mask tokens in the encoder
  const tokenIds = [{ id: 'abl-r75', setting: 'visible patches only (published)' }, { id: 'abl-encoder-mask-token', setting: 'every patch, removed ones as a mask token' }];
  w('## Encoder with or without mask tokens (Table 1c, and the speed-up of Table 2)');
  w();
  w(maeRows(tokenIds, results));
  w();
  const skip = results.get('abl-r75')?.training;
  const tokens = results.get('abl-encoder-mask-token')?.training;
  if (skip && tokens) {
    w(`Pre-training wall-clock with mask tokens in the encoder / without: **${(tokens.seconds / skip.seconds).toFixed(2)}x** (${secs(tokens.seconds)} s against ${secs(skip.seconds)} s for the same ${skip.epochs} epochs; the encoder sees ${1 + 64} tokens per image instead of ${1 + 16}).`);
    w();
  }
  // Budget summary
  w('## Every run');
  w();
  w(table(
    ['Run', 'What', 'Commit', 'Epochs', 'Steps', 'Training (s)', 'Embedding (s)', 'kNN (s)', 'Probe (s)', 'Finished'],
    RUNS.map((spec) => {
      const r = results.get(spec.id);
      if (!r) return [`\`${spec.id}\``, spec.title, NOT_RUN, '', '', '', '', '', '', ''];
      return [`\`${spec.id}\``, spec.title, `${r.commit}${r.dirty ? '+' : ''}`, String(r.training?.epochs ?? 0), String(r.training?.steps ?? 0), secs(r.training?.seconds ?? 0), secs(r.evaluation?.embedSeconds), secs(r.evaluation?.knnSeconds), secs(r.evaluation?.probeSeconds), r.finishedAt.slice(0, 16).replace('T', ' ')];
    }),
  ));
  w();
  w('A `+` after a commit: the run came from a working tree with uncommitted changes.');
  const page = out.join('\n').replace(/\n{3,}/g, '\n\n');
  writeFileSync(join(DOCS, 'results.md'), page.endsWith('\n') ? page : page + '\n');
  console.log(`wrote ${relative(ROOT, join(DOCS, 'results.md'))} and ${relative(ROOT, resultsDir)}/`);
}

// ---------------------------------------------------------------------------------------

const data = loadData();
mkdirSync(OUT, { recursive: true });
console.log(`study${QUICK ? ' (quick)' : ''}: ${data.trainCount} train / ${data.testCount} test images from ${DATA_DIR}; runs in ${relative(ROOT, OUT) || OUT}; commit ${COMMIT}${DIRTY ? ' (dirty)' : ''}`);
if (!flag('report')) {
  for (const spec of RUNS) {
    if (ONLY && !ONLY.includes(spec.id)) continue;
    if (readResult(spec.id)) {
      console.log(`${spec.id}: done before, skipped`);
      continue;
    }
    console.log(`${spec.id}: ${spec.title}`);
    const t0 = performance.now();
    await runOne(spec, data);
    console.log(`${spec.id}: ${((performance.now() - t0) / 1000).toFixed(1)} s in all`);
  }
}
writeReport(data);
