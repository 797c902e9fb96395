#!/usr/bin/env node
// The `vit-mae` command line: pretrain, finetune, linprobe, eval, embed, reconstruct, info.
// Exit codes: 0 success, 1 failure (a VitMaeError; its code is printed), 2 bad usage,
// 130 stopped by SIGINT/SIGTERM after writing a checkpoint.
import { mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import cliProgress from 'cli-progress';
import {
  MaskedAutoencoder,
  VitClassifier,
  VitMaeError,
  type TrainingRun,
  type TrainingSummary,
  type Protocol,
  inspectCheckpoint,
  loadImages,
  setAllowTf32,
  writeReconstructionGrid,
  type Device,
  type Precision,
  type DatasetSource,
  type MaeConfig,
  type MaskingStrategy,
  type PresetName,
  type DistributedOptions,
  type StartedEvent,
  type AugmentOptions,
} from './index.js';
import { cropFraction } from './data.js';
import { binding, callSync } from './native.js';

const EXIT_FAILURE = 1;
const EXIT_USAGE = 2;
const EXIT_INTERRUPTED = 130;

function number(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n)) throw new InvalidArgumentError(`'${value}' is not a number`);
  return n;
}

function integer(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError(`'${value}' is not a non-negative integer`);
  return n;
}

function json(value: string): Partial<MaeConfig> {
  try {
    return JSON.parse(value) as Partial<MaeConfig>;
  } catch {
    throw new InvalidArgumentError('--config must be a JSON object');
  }
}

/** Prints a run's events (a progress bar on a TTY) and returns its summary. */
async function follow(run: TrainingRun, out: Output): Promise<TrainingSummary> {
  const bar = !out.json && process.stderr.isTTY
    ? new cliProgress.SingleBar({ format: 'step {value}/{total} [{bar}] epoch {epoch} loss {loss} lr {lr} {ips} img/s eta {etaText}', stream: process.stderr }, cliProgress.Presets.shades_classic)
    : null;
  let barStarted = false;
  for await (const e of run) {
    if (e.type === 'started') {
      // Under mpirun every rank runs this command; rank 0 alone speaks and writes.
      quietUnlessRankZero(out, e);
      emit(out, { ...e }, e.worldSize > 1 ? `training on ${e.worldSize} ranks (${e.backend}); batch size and workers are per rank` : undefined);
      continue;
    }
    emit(out, { ...e });
    if (out.quiet) continue;
    if (e.type === 'step') {
      const fields = { epoch: e.epoch, loss: e.loss.toFixed(4), lr: e.lr.toExponential(2), ips: e.imagesPerSec.toFixed(1), etaText: `${Math.round(e.etaSeconds)}s` };
      if (bar) {
        if (!barStarted) bar.start(e.totalSteps, e.step, fields);
        barStarted = true;
        bar.update(e.step, fields);
      } else if (!out.json && (e.step % 10 === 0 || e.step === e.totalSteps)) {
        process.stderr.write(`step ${e.step}/${e.totalSteps} epoch ${e.epoch} loss ${fields.loss} lr ${fields.lr} ${fields.ips} img/s eta ${fields.etaText}\n`);
      }
    } else if (e.type === 'skipped') {
      process.stderr.write(`warning: skipped ${e.count} unreadable image(s): ${e.message}\n`);
    } else if (e.type === 'pcaBasis' && !out.json) {
      process.stderr.write(`PCA target: ${e.components} components keep ${(100 * e.keptVariance).toFixed(2)}% of the variance of ${e.patches} patches of ${e.images} images\n`);
    } else if (e.type === 'eval' && !out.json) {
      const line = `epoch ${e.epoch}: test top-1 ${(100 * e.top1).toFixed(2)}% top-5 ${(100 * e.top5).toFixed(2)}% loss ${e.loss.toFixed(4)}`;
      if (bar) {
        bar.stop();
        barStarted = false;
      }
      process.stderr.write(`${line}\n`);
    }
  }
  bar?.stop();
  return run.result;
}

/**
 * Stops `controller` on SIGINT/SIGTERM: training then writes a checkpoint and ends
 * with its summary, an evaluation or embedding rejects with `E_ABORTED`; either way the
 * command exits 130.
 */
function abortOnSignal(out: Output, what: string): AbortController {
  const controller = new AbortController();
  const stop = () => {
    emit(out, { type: 'interrupt' }, `\n${what}`);
    controller.abort();
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  return controller;
}

/**
 * Progress of a pass over a dataset: a bar on a TTY, else (without `--json`) a line
 * every 10 batches and at the end, as training prints its steps.
 */
function passProgress(out: Output): { onProgress: (done: number, total: number) => void; stop: () => void } {
  const bar = !out.json && process.stderr.isTTY ? new cliProgress.SingleBar({ format: 'images {value}/{total} [{bar}]', stream: process.stderr }, cliProgress.Presets.shades_classic) : null;
  let batches = 0;
  return {
    onProgress: (done, total) => {
      if (out.quiet) return;
      batches += 1;
      if (bar) {
        if (batches === 1) bar.start(total, done);
        bar.update(done);
      } else if (!out.json && (batches % 10 === 0 || done === total)) {
        process.stderr.write(`images ${done}/${total}\n`);
      }
    },
    stop: () => bar?.stop(),
  };
}

/** Creates `dir` if needed and fails (E_IO naming it) unless files can be written there: before the work whose output goes there. */
function checkWritable(dir: string): void {
  callSync(() => binding.checkWritableFolder(dir));
}

/** A dataset from a path: a folder of images, or an IDX file (optionally with labels). */
function dataset(path: string, labels?: string): DatasetSource {
  return /idx\d-ubyte(\.gz)?$/.test(path) ? { kind: 'idx', path, labelsPath: labels } : { kind: 'folder', path };
}

interface Output {
  json: boolean;
  /** Set on the ranks other than 0 of a distributed run: they print nothing but errors. */
  quiet?: boolean;
}

function emit(out: Output, record: Record<string, unknown>, text?: string): void {
  if (out.quiet) return;
  if (out.json) process.stdout.write(`${JSON.stringify(record)}\n`);
  else if (text !== undefined) process.stderr.write(`${text}\n`);
}

/** Where `reconstruct` takes its images from: the first `count` of a dataset, or image files. */
type ReconstructionInput = { dataset: DatasetSource; count: number } | { files: string[]; cropFraction?: number };

async function reconstructionPng(mae: MaskedAutoencoder, input: ReconstructionInput, path: string, opts: { maskRatio: number; masking: MaskingStrategy; seed: number; padTo?: number }): Promise<number> {
  const { imgSize, inChans } = mae.config;
  const { images, transform, n } =
    'files' in input
      ? { images: input.files, transform: { padTo: opts.padTo, cropFraction: input.cropFraction }, n: input.files.length }
      : await loadImages(input.dataset, { imgSize, inChans, count: input.count, augment: { padTo: opts.padTo } }).then((t) => ({ images: t, transform: undefined, n: t.shape[0] }));
  const L = (imgSize / mae.config.patchSize) ** 2;
  // Noise from a fixed generator, so the same checkpoint always shows the same masks.
  let state = opts.seed + 1;
  const noise = { data: Float32Array.from({ length: n * L }, () => ((state = (state * 1103515245 + 12345) % 2147483648) / 2147483648)), shape: [n, L] };
  const rec = await mae.reconstruct(images, { maskRatio: opts.maskRatio, masking: opts.masking, noise: opts.masking === 'random' ? noise : undefined, transform });
  mkdirSync(dirname(path), { recursive: true });
  await writeReconstructionGrid(path, rec);
  return rec.loss;
}

/** The recipe defaults a training command shows in its help. */
interface RecipeDefaults {
  out: string;
  epochs: number;
  blr: number;
  minLr: number;
  warmupEpochs: number;
  weightDecay: number;
}

/** Where and in what a command computes: `--device`, `--precision`, `--tf32`. */
function addComputeOptions(command: Command): Command {
  return command
    .option('--device <device>', "'auto' (a working GPU, else the CPU), 'cpu', 'cuda' or 'cuda:N'; under mpirun or srun, 'auto' and 'cuda' take the GPU of the local rank", 'auto')
    .addOption(new Option('--precision <p>', 'f32, or bf16 mixed precision (for GPUs)').choices(['f32', 'bf16']).default('f32'))
    .option('--tf32', 'let f32 matrix products on CUDA use TF32 tensor cores');
}

/** The compute options as load/create options; applies `--tf32`. */
function computeOptions(o: Record<string, unknown>): { device: Device; precision: Precision } {
  if (o.tf32 === true) setAllowTf32(true);
  return { device: o.device as Device, precision: o.precision as Precision };
}

/** How a command works with the other ranks of an MPI job: `--distributed`, `--distributed-timeout`. */
function addDistributedOptions(command: Command): Command {
  return command
    .addOption(new Option('--distributed <kind>', "'auto': join the MPI job this process was launched in (mpirun, srun), if any; 'mpi': always; 'none': never").choices(['auto', 'mpi', 'none']).default('auto'))
    .option('--distributed-timeout <s>', 'seconds a rank waits for the others before failing (a rank died or hangs)', number, 300);
}

/** The distributed options as training or pass options. */
function distributedOptions(o: Record<string, unknown>): DistributedOptions {
  return { distributed: o.distributed as DistributedOptions['distributed'], distributedTimeout: o.distributedTimeout as number };
}

/** Quiets `out` on ranks other than 0 of a distributed run or pass, from its started event. */
function quietUnlessRankZero(out: Output, event: StartedEvent): void {
  out.quiet = event.rank !== 0;
}

/** The augmentation settings of the paper's Table 1e, as `--augment` names them. */
const AUGMENT_SETTINGS: Record<string, AugmentOptions> = {
  none: { crop: 'center', hflip: false },
  'crop-fixed': { crop: 'fixed' },
  crop: { crop: 'randomResized' },
  'crop-jitter': { crop: 'randomResized', colorJitter: 0.4 },
};

/** The training augmentation the options of `addRecipeOptions` ask for. */
function augmentOptions(o: Record<string, unknown>): AugmentOptions {
  if (o.augment !== undefined && o.crop === false) throw new VitMaeError('E_ARGUMENT', '--no-crop and --augment both choose the crop: give one');
  const setting: AugmentOptions = o.augment === undefined ? { crop: o.crop === false ? 'center' : 'randomResized' } : AUGMENT_SETTINGS[o.augment as string];
  return {
    ...setting,
    ...(o.flip === false ? { hflip: false } : {}),
    padTo: o.padTo as number | undefined,
    cropFraction: o.cropFraction as number | undefined,
    randAugment: o.randAugment as string | undefined,
    randomErasing: o.reprob as number,
  };
}

/** The options every training command has. */
function addRecipeOptions(command: Command, d: RecipeDefaults): Command {
  return addDistributedOptions(addComputeOptions(command))
    .option('--out <dir>', 'run folder: checkpoints and the final model', d.out)
    .option('--resume [checkpoint]', 'continue from a training checkpoint (default: the newest in <out>/checkpoints)')
    .option('--epochs <n>', 'epochs (a fraction ends the last one early)', number, d.epochs)
    .option('--batch-size <n>', 'images per step', integer, 64)
    .option('--accum-iter <n>', 'micro-batches per optimizer step', integer, 1)
    .option('--blr <lr>', 'base learning rate (lr = blr * batch / 256)', number, d.blr)
    .option('--lr <lr>', 'absolute learning rate (overrides --blr)', number)
    .option('--min-lr <lr>', 'final learning rate', number, d.minLr)
    .option('--warmup-epochs <n>', 'warm-up epochs', number, d.warmupEpochs)
    .option('--weight-decay <wd>', 'weight decay', number, d.weightDecay)
    .option('--clip-grad <norm>', 'clip the global gradient norm', number)
    .option('--seed <n>', 'seed for weights, data order, augmentation and the recipe\'s randomness', integer, 0)
    .option('--max-steps <n>', 'stop after this many steps', integer)
    .option('--checkpoint-every <n>', 'checkpoint every n steps (and at the end)', integer, 0)
    .option('--keep-last <n>', 'checkpoints to keep', integer, 3)
    .option('--pad-to <n>', 'zero-pad images to this side first (e.g. 32 for 28x28 Fashion-MNIST)', integer)
    .option('--no-crop', 'resize instead of RandomResizedCrop (as --augment none, with flips)')
    .option('--no-flip', 'no horizontal flips')
    .addOption(new Option('--augment <setting>', "the paper's Table 1e: none (central crop, no flip), crop-fixed (random crop of --crop-fraction, flip), crop (RandomResizedCrop, flip; the default), crop-jitter (crop + ColorJitter 0.4)").choices(Object.keys(AUGMENT_SETTINGS)))
    .option('--crop-fraction <f>', 'side of the crop-fixed crop and of the evaluation\'s central crop, as a fraction of the shorter side (published evaluation: 0.875)', number)
    .option('--rand-augment <spec>', "timm's RandAugment, e.g. rand-m9-mstd0.5-inc1 (the published fine-tuning's)")
    .option('--reprob <p>', "timm's random erasing probability, pixel mode (the published fine-tuning's: 0.25)", number, 0)
    .option('--workers <n>', 'data threads', integer, 2)
    .option('--json', 'print one JSON object per event on stdout');
}

/** The run options every training command passes on, from its parsed options. */
function recipeOptions(o: Record<string, unknown>, checkpointDir: string, signal: AbortSignal) {
  return {
    epochs: o.epochs as number,
    batchSize: o.batchSize as number,
    accumIter: o.accumIter as number,
    blr: o.blr as number,
    lr: o.lr as number | undefined,
    minLr: o.minLr as number,
    warmupEpochs: o.warmupEpochs as number,
    weightDecay: o.weightDecay as number,
    clipGrad: o.clipGrad as number | undefined,
    seed: o.seed as number,
    maxSteps: o.maxSteps as number | undefined,
    workers: o.workers as number,
    checkpointDir,
    checkpointEvery: o.checkpointEvery as number,
    keepLast: o.keepLast as number,
    resume: o.resume === true ? checkpointDir : (o.resume as string | undefined),
    ...distributedOptions(o),
    signal,
  };
}

const program = new Command()
  .name('vit-mae')
  .description('Masked autoencoders (ViT-MAE): pre-train, fine-tune, linear-probe, evaluate, embed, reconstruct, inspect checkpoints.')
  .showHelpAfterError()
  .exitOverride();

addRecipeOptions(
  program
    .command('pretrain')
    .description('pre-train an MAE on a folder of images or an IDX file, with checkpoints and a reconstruction PNG at the end')
    .requiredOption('--data <path>', 'image folder (class sub-folders allowed) or IDX file (.gz or plain)')
    .addOption(new Option('--preset <name>', 'model preset').default('mae_vit_base_patch16'))
    .option('--config <json>', 'model config fields (override the preset)', json)
    .option('--init <checkpoint>', 'start from these weights instead of a fresh model')
    .option('--mask-ratio <r>', 'fraction of patches removed', number, 0.75)
    .addOption(new Option('--masking <kind>', 'masking strategy').choices(['random', 'block', 'grid']).default('random')),
  { out: 'runs/pretrain', epochs: 400, blr: 1.5e-4, minLr: 0, warmupEpochs: 40, weightDecay: 0.05 },
)
  .action(async (o) => {
    const out: Output = { json: Boolean(o.json) };
    checkWritable(o.out);
    const checkpointDir = join(o.out, 'checkpoints');
    const mae = o.init
      ? await MaskedAutoencoder.load(o.init, { config: o.config, seed: o.seed, ...computeOptions(o) })
      : MaskedAutoencoder.create({ preset: o.preset as PresetName, config: o.config, seed: o.seed, ...computeOptions(o) });
    const source = dataset(o.data);
    const controller = abortOnSignal(out, 'stopping after this step and writing a checkpoint...');
    const run = mae.pretrain({
      ...recipeOptions(o, checkpointDir, controller.signal),
      data: source,
      augment: augmentOptions(o),
      maskRatio: o.maskRatio,
      masking: o.masking as MaskingStrategy,
    });
    const summary = await follow(run, out);
    if (summary.aborted) process.exitCode = EXIT_INTERRUPTED;
    if (out.quiet) return;
    const modelPath = join(o.out, 'model.safetensors');
    await mae.save(modelPath);
    const png = join(o.out, 'reconstruction.png');
    const reconstructionLoss = await reconstructionPng(mae, { dataset: source, count: 8 }, png, { maskRatio: o.maskRatio, masking: o.masking, seed: o.seed, padTo: o.padTo });
    emit(out, { type: 'summary', ...summary, model: modelPath, reconstruction: png, reconstructionLoss },
      `${summary.aborted ? 'stopped' : 'done'}: ${summary.steps} steps, final loss ${summary.finalLoss.toFixed(4)}, ${summary.imagesSeen} images in ${summary.seconds.toFixed(1)} s` +
      `${summary.skippedImages ? `, ${summary.skippedImages} unreadable images skipped` : ''}\nmodel: ${modelPath}\nreconstruction: ${png}`);
  });

/** The recipe defaults of a protocol (`main_finetune.py` / `main_linprobe.py`), for the help text. */
const PROTOCOL_DEFAULTS = {
  finetune: { epochs: 50, blr: 1e-3, minLr: 1e-6, warmupEpochs: 5, weightDecay: 0.05 },
  linprobe: { epochs: 90, blr: 0.1, minLr: 0, warmupEpochs: 10, weightDecay: 0 },
} as const;

function trainingCommand(name: 'finetune' | 'linprobe', description: string): Command {
  const d = PROTOCOL_DEFAULTS[name];
  const command = addRecipeOptions(
    program
      .command(name)
      .description(description)
      .argument('<pretrained>', 'pre-trained MAE (.safetensors, .pth, Hugging Face folder); with --resume, ignored in favour of the checkpoint')
      .requiredOption('--data <path>', 'labelled training images: class sub-folders, or an IDX images file with --labels')
      .option('--labels <path>', 'IDX labels file for --data')
      .option('--eval-data <path>', 'labelled images to evaluate on after every epoch')
      .option('--eval-labels <path>', 'IDX labels file for --eval-data')
      .requiredOption('--num-classes <n>', 'classes', integer)
      .option('--config <json>', 'MAE config fields the checkpoint does not tell', json)
      .option('--crop-scale <min>', 'smallest RandomResizedCrop area', number, 0.08),
    { out: `runs/${name}`, ...d },
  );
  if (name === 'finetune') {
    command
      .option('--partial-blocks <k>', 'partial fine-tuning: train only the last k blocks (and the norm and head)', integer)
      .option('--layer-decay <d>', 'layer-wise lr decay', number, 0.75)
      .option('--drop-path <rate>', 'stochastic depth rate', number, 0.1)
      .option('--smoothing <s>', 'label smoothing', number, 0.1)
      .option('--mixup <alpha>', 'mixup alpha (0: off)', number, 0)
      .option('--cutmix <alpha>', 'cutmix alpha (0: off)', number, 0)
      .option('--mixup-prob <p>', 'probability a batch is mixed', number, 1)
      .option('--mixup-switch-prob <p>', 'probability of cutmix when both are on', number, 0.5)
      .option('--cls-token', 'classify from the cls token (after norm) instead of global pooling');
  } else {
    command.option('--global-pool', 'probe the mean of the patch tokens instead of the cls token');
  }
  return command.action(async (pretrained: string, o) => {
    const out: Output = { json: Boolean(o.json) };
    checkWritable(o.out);
    const checkpointDir = join(o.out, 'checkpoints');
    const protocol: Protocol = name === 'linprobe' ? 'linprobe' : o.partialBlocks !== undefined ? 'partial' : 'finetune';
    const globalPool = name === 'linprobe' ? Boolean(o.globalPool) : !o.clsToken;
    const clf = await VitClassifier.fromPretrained(pretrained, { numClasses: o.numClasses, globalPool, headBatchNorm: name === 'linprobe', config: o.config, seed: o.seed, ...computeOptions(o) });
    const controller = abortOnSignal(out, 'stopping after this step and writing a checkpoint...');
    const augment: AugmentOptions = { ...augmentOptions(o), scale: [o.cropScale, 1] };
    const evalData = o.evalData === undefined ? undefined : dataset(o.evalData, o.evalLabels);
    const run = clf.finetune({
      ...recipeOptions(o, checkpointDir, controller.signal),
      data: dataset(o.data, o.labels),
      evalData,
      augment,
      protocol,
      partialBlocks: o.partialBlocks,
      layerDecay: o.layerDecay,
      dropPath: o.dropPath,
      labelSmoothing: o.smoothing,
      mixup: o.mixup,
      cutmix: o.cutmix,
      mixupProb: o.mixupProb,
      mixupSwitchProb: o.mixupSwitchProb,
    });
    const summary = await follow(run, out);
    const modelPath = join(o.out, 'model.safetensors');
    if (!out.quiet) await clf.save(modelPath);
    // Every rank takes its shard of the evaluation, as during training.
    const evaluation = evalData === undefined ? undefined : await clf.evaluate(evalData, { batchSize: o.batchSize, workers: o.workers, augment: { padTo: o.padTo, cropFraction: cropFraction(augment) }, ...distributedOptions(o) });
    const accuracy = evaluation ? `\ntest: top-1 ${(100 * evaluation.top1).toFixed(2)}%, top-5 ${(100 * evaluation.top5).toFixed(2)}% on ${evaluation.count} images` : '';
    emit(out, { type: 'summary', ...summary, model: modelPath, evaluation },
      `${summary.aborted ? 'stopped' : 'done'}: ${summary.steps} steps, final loss ${summary.finalLoss.toFixed(4)}, ${summary.imagesSeen} images in ${summary.seconds.toFixed(1)} s${accuracy}\nmodel: ${modelPath}`);
    if (summary.aborted) process.exitCode = EXIT_INTERRUPTED;
  });
}

trainingCommand('finetune', 'fine-tune a classifier on a pre-trained encoder (all blocks, or the last k with --partial-blocks)');
trainingCommand('linprobe', 'linear probing: a BatchNorm + linear head on the frozen pre-trained encoder, trained with LARS');

addDistributedOptions(program
  .command('eval'))
  .description('top-1/top-5 accuracy of a classifier checkpoint on labelled images')
  .argument('<checkpoint>', 'classifier: .safetensors or .pth (published fine-tuning or linear-probe layout)')
  .requiredOption('--data <path>', 'labelled images: class sub-folders, or an IDX images file with --labels')
  .option('--labels <path>', 'IDX labels file for --data')
  .option('--batch-size <n>', 'images per batch', integer, 64)
  .option('--pad-to <n>', 'zero-pad images to this side first', integer)
  .option('--crop-fraction <f>', 'resize the central square of this fraction of the shorter side (published evaluation: 0.875)', number)
  .option('--workers <n>', 'data threads', integer, 2)
  .option('--config <json>', 'classifier config fields the checkpoint does not tell', json)
  .option('--json', 'print the result as JSON on stdout')
  .action(async (checkpoint: string, o) => {
    const out: Output = { json: Boolean(o.json) };
    const clf = await VitClassifier.load(checkpoint, { config: o.config });
    const controller = abortOnSignal(out, 'stopping...');
    const progress = passProgress(out);
    const e = await clf.evaluate(dataset(o.data, o.labels), { batchSize: o.batchSize, workers: o.workers, augment: { padTo: o.padTo, cropFraction: o.cropFraction }, ...distributedOptions(o), signal: controller.signal, onStarted: (e) => quietUnlessRankZero(out, e), onProgress: progress.onProgress }).finally(progress.stop);
    emit(out, { type: 'evaluation', path: checkpoint, ...e }, `top-1 ${(100 * e.top1).toFixed(2)}%  top-5 ${(100 * e.top5).toFixed(2)}%  loss ${e.loss.toFixed(4)}  (${e.count} images)`);
  });

addDistributedOptions(addComputeOptions(program
  .command('embed')))
  .description('write the embeddings of a dataset (safetensors: embeddings [N, D], indices, labels) from a classifier or MAE checkpoint')
  .argument('<checkpoint>', 'a classifier (its head input) or an MAE (pooled encoder output)')
  .requiredOption('--data <path>', 'image folder or IDX file')
  .option('--labels <path>', 'IDX labels file for --data (stored with the embeddings)')
  .option('--out <file>', 'output file', 'embeddings.safetensors')
  .addOption(new Option('--pool <kind>', 'MAE pooling: mean of the patch tokens or the cls token').choices(['mean', 'cls']).default('mean'))
  .option('--batch-size <n>', 'images per batch', integer, 64)
  .option('--pad-to <n>', 'zero-pad images to this side first', integer)
  .option('--crop-fraction <f>', 'resize the central square of this fraction of the shorter side (published evaluation: 0.875)', number)
  .option('--workers <n>', 'data threads', integer, 2)
  .option('--config <json>', 'config fields the checkpoint does not tell', json)
  .option('--json', 'print the result as JSON on stdout')
  .action(async (checkpoint: string, o) => {
    const out: Output = { json: Boolean(o.json) };
    checkWritable(dirname(o.out));
    const controller = abortOnSignal(out, 'stopping...');
    const progress = passProgress(out);
    const options = { batchSize: o.batchSize, workers: o.workers, augment: { padTo: o.padTo, cropFraction: o.cropFraction }, output: o.out, ...distributedOptions(o), signal: controller.signal, onStarted: (e: StartedEvent) => quietUnlessRankZero(out, e), onProgress: progress.onProgress };
    const source = dataset(o.data, o.labels);
    // A checkpoint with a classification head embeds as a classifier, any other as an MAE.
    const compute = computeOptions(o);
    const model = await VitClassifier.load(checkpoint, { config: o.config, ...compute }).catch(async (error: unknown) => {
      if (error instanceof VitMaeError && error.code === 'E_CHECKPOINT_KEYS' && /no classification head/.test(error.message)) {
        return MaskedAutoencoder.load(checkpoint, { config: o.config as Partial<MaeConfig>, ...compute });
      }
      throw error;
    });
    const e = await (model instanceof VitClassifier ? model.embedDataset(source, options) : model.embedDataset(source, { ...options, pool: o.pool })).finally(progress.stop);
    const [n, dim] = e.features.shape;
    emit(out, { type: 'embeddings', path: o.out, count: n, dim, labelled: e.labels !== null }, `wrote ${o.out}: ${n} embeddings of ${dim} values`);
  });

addComputeOptions(program
  .command('reconstruct'))
  .description('write a PNG grid (masked | reconstruction | reconstruction + visible | original) for image files, or for the first images of a dataset')
  .argument('<checkpoint>', 'model: .safetensors, .pth or a Hugging Face folder')
  .argument('[images...]', 'image files (PNG, JPEG, WebP, ...), one row each; or give --data')
  .option('--data <path>', 'image folder or IDX file, instead of image files')
  .option('--out <png>', 'output PNG', 'reconstruction.png')
  .option('--count <n>', 'images (rows) of --data', integer, 8)
  .option('--mask-ratio <r>', 'fraction of patches removed', number, 0.75)
  .addOption(new Option('--masking <kind>', 'masking strategy').choices(['random', 'block', 'grid']).default('random'))
  .option('--seed <n>', 'seed for the masks', integer, 0)
  .option('--pad-to <n>', 'zero-pad images to this side first', integer)
  .option('--crop-fraction <f>', 'image files: resize the central square of this fraction of the shorter side (default 0.875, the published evaluation)', number)
  .option('--config <json>', 'model config fields the checkpoint does not tell', json)
  .option('--json', 'print the result as JSON on stdout')
  .action(async (checkpoint: string, files: string[], o, command: Command) => {
    if ((files.length > 0) === (o.data !== undefined)) command.error('error: reconstruct takes image files or --data, not both and not neither', { code: 'commander.usage' });
    const mae = await MaskedAutoencoder.load(checkpoint, { config: o.config, ...computeOptions(o) });
    const input: ReconstructionInput = files.length > 0 ? { files, cropFraction: o.cropFraction } : { dataset: dataset(o.data), count: o.count };
    const loss = await reconstructionPng(mae, input, o.out, { maskRatio: o.maskRatio, masking: o.masking, seed: o.seed, padTo: o.padTo });
    emit({ json: Boolean(o.json) }, { type: 'reconstruction', path: o.out, loss }, `wrote ${o.out} (loss ${loss.toFixed(4)})`);
  });

program
  .command('info')
  .description('what a checkpoint holds: format, config, parameter count (of an MAE or a classifier)')
  .argument('<checkpoint>', 'model: .safetensors, .pth or a Hugging Face folder')
  .option('--config <json>', 'config fields the checkpoint does not tell', json)
  .option('--json', 'print as JSON on stdout')
  .action(async (checkpoint: string, o) => {
    const inspection = await inspectCheckpoint(checkpoint);
    const describe = (kind: string, lines: Record<string, unknown>, config: object) => {
      const shapes = Object.values(inspection.tensors);
      const values = shapes.reduce((n, shape) => n + shape.reduce((a, b) => a * b, 1), 0);
      process.stdout.write(`${checkpoint}\n  kind: ${kind}\n  format: ${inspection.format}\n  tensors: ${shapes.length} (${values.toLocaleString()} values)\n`);
      for (const [k, v] of [...Object.entries(lines), ...Object.entries(config)]) process.stdout.write(`  ${k}: ${v}\n`);
    };
    // A classification head makes it a classifier, as VitClassifier.load and `embed` decide.
    if ('head.weight' in inspection.tensors || 'head.1.weight' in inspection.tensors) {
      const clf = await VitClassifier.load(checkpoint, { config: o.config });
      const { globalPool, headBatchNorm } = clf.config;
      const info = { path: checkpoint, kind: 'classifier', format: clf.checkpointFormat, tensors: inspection.tensors, parameterCount: clf.parameterCount, config: clf.config };
      if (o.json) process.stdout.write(`${JSON.stringify(info)}\n`);
      else {
        describe('classifier', {
          parameters: info.parameterCount.toLocaleString(),
          pooling: globalPool ? 'mean of the patch tokens, then fc_norm' : 'cls token after norm',
          head: headBatchNorm ? 'BatchNorm + linear (linear probe)' : 'linear',
        }, clf.config);
      }
      return;
    }
    const unknown = inspection.unknown.filter((k) => o.config?.[k] === undefined);
    if (unknown.length > 0) {
      // The file does not tell all of its config: say what it holds and what to pass.
      const known = { ...inspection.config, ...o.config };
      const hint = `pass them with --config '${JSON.stringify(Object.fromEntries(unknown.map((k) => [k, 'N'])))}'`;
      if (o.json) process.stdout.write(`${JSON.stringify({ path: checkpoint, kind: 'mae', format: inspection.format, tensors: inspection.tensors, config: known, unknown })}\n`);
      else {
        describe('mae', {}, known);
        process.stdout.write(`  unknown: ${unknown.join(', ')} (the shapes do not tell them): ${hint}\n`);
      }
      return;
    }
    const mae = await MaskedAutoencoder.load(checkpoint, { config: o.config });
    const info = { path: checkpoint, kind: 'mae', format: mae.checkpointFormat, tensors: inspection.tensors, parameterCount: mae.parameterCount, freshDecoder: mae.freshDecoder, ignoredConfigFields: mae.ignoredConfigFields, config: mae.config };
    if (o.json) process.stdout.write(`${JSON.stringify(info)}\n`);
    else {
      const decoder = info.freshDecoder ? { decoder: 'not in the checkpoint (encoder only)' } : {};
      const ignored = info.ignoredConfigFields.length > 0 ? { 'ignored config.json fields': info.ignoredConfigFields.join(', ') } : {};
      describe('mae', { parameters: info.parameterCount.toLocaleString(), ...decoder, ...ignored }, info.config);
    }
  });

try {
  await program.parseAsync();
} catch (error) {
  const e = error as { code?: string; exitCode?: number; message?: string };
  if (error instanceof VitMaeError && error.code === 'E_ABORTED') {
    // Ctrl-C during an evaluation or embedding (abortOnSignal).
    process.stderr.write(`stopped: ${error.message}\n`);
    process.exitCode = EXIT_INTERRUPTED;
  } else if (error instanceof VitMaeError) {
    process.stderr.write(`error [${error.code}]: ${error.message}\n`);
    process.exitCode = EXIT_FAILURE;
  } else if (typeof e.code === 'string' && e.code.startsWith('commander.')) {
    // commander has printed the problem (or the help or version) already. Its exit code
    // is 0 for the help or version asked for, 1 for bad usage, the help it prints for
    // want of a command included.
    process.exitCode = e.exitCode === 0 ? 0 : EXIT_USAGE;
  } else {
    process.stderr.write(`error: ${e.message ?? String(error)}\n`);
    process.exitCode = EXIT_FAILURE;
  }
}
