import type { ClassifierConfig, Device, Precision } from './config.js';
import { VitMaeError } from './errors.js';
import { binding, call, callSync, maeNatives, type Binding } from './native.js';
import { checkTensor, type Tensor } from './tensor.js';
import { embedInChunks, modelInput, type Images, type TransformOptions } from './images.js';
import { cropFraction, datasetSpec, loaderSpec, passSpec, type AugmentOptions, type DatasetSource } from './data.js';
import { forwardProgress, runJob, TrainingRun, type RecipeOptions } from './train.js';
import { warnIgnoredConfigFields, betaFields, checkDevice, checkNotAborted, checkPath, checkPrecision, checkRecipeKeys, checkSeed, configJson, distributedSpec, featureMapsOf, fromNative, optionsJson, type Embeddings, type FeatureMapOptions, type FeatureMaps, type PassOptions } from './common.js';
import type { MaskedAutoencoder, LossAndGradients, LoadOptions } from './index.js';

/** Options for {@link VitClassifier.fromPretrained}. */
export interface FromPretrainedOptions {
  /** Classes the new head predicts. */
  numClasses: number;
  /** Mean-pool the patch tokens into `fc_norm` (published fine-tuning, default true), or use the cls token after `norm`. */
  globalPool?: boolean;
  /** Put the linear probe's `BatchNorm1d(affine=False)` before the head. Default false (true for linear probing). */
  headBatchNorm?: boolean;
  /** Fine-tune at another resolution: the position embedding is resized bicubically, as published. */
  imgSize?: number;
  /** Seed of the new head's initialisation. Default 0. */
  seed?: number;
  /** With a checkpoint path: config fields the checkpoint does not tell (as {@link LoadOptions}). */
  config?: LoadOptions['config'];
  /** With a checkpoint path: where to compute. Default `'auto'`. (A model passed in keeps its own.) */
  device?: Device;
  /** With a checkpoint path: what to compute in. Default `'f32'`. (A model passed in keeps its own.) */
  precision?: Precision;
}

/** Options for {@link VitClassifier.load}. */
export interface ClassifierLoadOptions {
  /** Config fields to use instead of what the checkpoint holds or implies (a `.pth` of a non-preset width needs `numHeads`). */
  config?: Partial<ClassifierConfig>;
  /** Seed (unused by a complete checkpoint; kept for symmetry with `create`). Default 0. */
  seed?: number;
  /** Where to compute. Default `'auto'`: a working GPU, else the CPU. */
  device?: Device;
  /** What to compute in. Default `'f32'`. */
  precision?: Precision;
}

/** What {@link VitClassifier.predict} returns. */
export interface Prediction {
  /** The most likely class of each image. */
  top1: Int32Array;
  /** The `min(5, numClasses)` most likely classes of each image, most likely first. */
  top5: Int32Array[];
  /** `[N, numClasses]` softmax of the logits. */
  probabilities: Tensor;
}

/** Accuracy on a labelled dataset. */
export interface Evaluation {
  /** Fraction of images whose label is the most likely class. */
  top1: number;
  /** Fraction whose label is among the five most likely (all classes if fewer). */
  top5: number;
  /** Mean cross-entropy, without label smoothing. */
  loss: number;
  /** Images evaluated. */
  count: number;
}

/** A fine-tuning protocol of the paper: full fine-tuning, linear probing, or partial fine-tuning of the last blocks. */
export type Protocol = 'finetune' | 'linprobe' | 'partial';

/**
 * Options for {@link VitClassifier.finetune}. Defaults are those of
 * `main_finetune.py` (or `main_linprobe.py` for `protocol: 'linprobe'`).
 */
export interface FinetuneOptions extends RecipeOptions {
  /** Labelled images to evaluate on after every epoch ('eval' events). */
  evalData?: DatasetSource;
  /**
   * Training augmentation and normalisation. Default: RandomResizedCrop with scale
   * [0.08, 1] and flips. The published recipe adds `randAugment: 'rand-m9-mstd0.5-inc1'`,
   * `randomErasing: 0.25` and `cropFraction: 224 / 256` (evaluation's central crop).
   * Evaluation uses the same normalisation, padding and central crop, nothing random.
   */
  augment?: AugmentOptions;
  /** Default 'finetune'. */
  protocol?: Protocol;
  /** Blocks the 'partial' protocol trains (the last ones). Default 0: the final norm and head only. */
  partialBlocks?: number;
  /** Epochs (sets the schedule's length); a fraction ends the last epoch early, at the nearest whole step. Default 50 (linprobe 90). */
  epochs?: number;
  /** Base learning rate, `lr = blr * batchSize * accumIter / 256`. Default 1e-3 (linprobe 0.1; the published ViT-B recipe uses 5e-4 with layer decay 0.65). */
  blr?: number;
  /** Final learning rate of the cosine. Default 1e-6 (linprobe 0). */
  minLr?: number;
  /** Linear warm-up epochs. Default 5 (linprobe 10). */
  warmupEpochs?: number;
  /** Weight decay (AdamW, or LARS for linprobe). Default 0.05 (linprobe 0). */
  weightDecay?: number;
  /** Layer-wise learning-rate decay. Default 0.75 (1 for partial and linprobe). */
  layerDecay?: number;
  /** AdamW betas, a pair. Default [0.9, 0.999]. */
  betas?: [number, number];
  /** Stochastic depth rate of the last block (linear in depth). Default 0.1 (linprobe 0). */
  dropPath?: number;
  /** Label smoothing. Default 0.1 (linprobe 0). */
  labelSmoothing?: number;
  /** Mixup alpha; 0 turns it off. Default 0 (published ImageNet recipe: 0.8). */
  mixup?: number;
  /** CutMix alpha; 0 turns it off. Default 0 (published ImageNet recipe: 1.0). */
  cutmix?: number;
  /** Probability a batch is mixed. Default 1. */
  mixupProb?: number;
  /** With both on, the probability of CutMix. Default 0.5. */
  mixupSwitchProb?: number;
}

const PROTOCOLS: readonly Protocol[] = ['finetune', 'linprobe', 'partial'];

function checkImages(images: Tensor): void {
  checkTensor(images, 'images', 'E_SHAPE');
}

/** The augmentation default of the fine-tuning protocols: the published crop scale. */
const FINETUNE_AUGMENT: AugmentOptions = { scale: [0.08, 1] };

/**
 * A ViT classifier, as the published fine-tuning (`models_vit.py`): built on a
 * pre-trained MAE's encoder or loaded from a checkpoint, then fine-tuned, linearly
 * probed or partially fine-tuned, evaluated, and used for predictions and embeddings.
 *
 * ```ts
 * const clf = await VitClassifier.fromPretrained('mae.safetensors', { numClasses: 10 });
 * await clf.finetune({ data: train, evalData: test, epochs: 10 }).result;
 * const { top1 } = await clf.evaluate(test);
 * ```
 */
export class VitClassifier {
  readonly #native: Binding.NativeClassifier;
  readonly #config: Readonly<ClassifierConfig>;

  private constructor(native: Binding.NativeClassifier) {
    this.#native = native;
    this.#config = Object.freeze(JSON.parse(native.configJson) as ClassifierConfig);
  }

  /**
   * A classifier on a pre-trained encoder: a {@link MaskedAutoencoder}, or the path
   * of an MAE checkpoint (published `.pth`, encoder-only ones included, safetensors or
   * a Hugging Face folder). The encoder's weights are copied (its final `norm` only
   * for cls pooling), `fc_norm` starts at identity and the head at trunc-normal std
   * 2e-5 (0.01 with `headBatchNorm`), as published.
   */
  static async fromPretrained(mae: MaskedAutoencoder | string, options: FromPretrainedOptions): Promise<VitClassifier> {
    if (typeof options !== 'object' || options === null) throw new VitMaeError('E_ARGUMENT', 'fromPretrained needs options with numClasses');
    const { numClasses, globalPool, headBatchNorm, imgSize, seed, config, device, precision } = options;
    if (!Number.isInteger(numClasses) || numClasses < 1) throw new VitMaeError('E_CONFIG', `numClasses must be a positive integer, got ${String(numClasses)}`);
    let native: Binding.NativeMae | undefined;
    if (typeof mae === 'string') {
      const path = checkPath(mae);
      native = await call(() => binding.NativeMae.load(path, configJson(config), checkSeed(seed), checkDevice(device), checkPrecision(precision)));
      warnIgnoredConfigFields(native, path);
    } else native = maeNatives.get(mae);
    if (!native) throw new VitMaeError('E_ARGUMENT', 'fromPretrained needs a MaskedAutoencoder or a checkpoint path');
    const head = optionsJson({ numClasses, globalPool, headBatchNorm, imgSize }, 'E_CONFIG');
    return new VitClassifier(callSync(() => binding.NativeClassifier.fromMae(native, head, checkSeed(seed))));
  }

  /**
   * A freshly initialised classifier, to train from scratch (the MAE initialisation,
   * with the sin-cos table as the start of the learned position embedding).
   */
  static create(config: Partial<ClassifierConfig>, options: { seed?: number; device?: Device; precision?: Precision } = {}): VitClassifier {
    if (typeof config !== 'object' || config === null) throw new VitMaeError('E_CONFIG', 'create needs a ClassifierConfig');
    return new VitClassifier(callSync(() => binding.NativeClassifier.create(optionsJson(config, 'E_CONFIG'), checkSeed(options.seed), checkDevice(options.device), checkPrecision(options.precision))));
  }

  /**
   * Loads a classifier checkpoint: the published fine-tuning layout (`fc_norm` +
   * `head`, or `norm` + `head`) or the linear-probe layout (`head.0` BatchNorm +
   * `head.1`), as `.pth` (read without running code) or safetensors.
   */
  static async load(path: string, options: ClassifierLoadOptions = {}): Promise<VitClassifier> {
    const checkedPath = checkPath(path);
    const config = configJson(options.config);
    return new VitClassifier(await call(() => binding.NativeClassifier.load(checkedPath, config, checkSeed(options.seed), checkDevice(options.device), checkPrecision(options.precision))));
  }

  /** The classifier's configuration. */
  get config(): Readonly<ClassifierConfig> {
    return this.#config;
  }

  /**
   * Frees the native weights now, rather than when the garbage collector gets to this
   * object. A call already computing finishes first (the weights go when it does); one
   * still queued, and every later call, rejects or throws with `E_DISPOSED`. The
   * getters still answer.
   * Throws `E_BUSY` while the classifier trains. Calling it again does nothing. Also
   * available as `using` (`Symbol.dispose`).
   */
  dispose(): void {
    callSync(() => this.#native.dispose());
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  /** The number of trainable values. */
  get parameterCount(): number {
    return this.#native.parameterCount;
  }

  /** Where the classifier computes (`'cpu'`, `'cuda:0'`, ...). */
  get device(): string {
    return this.#native.device;
  }

  /** What the classifier computes in. */
  get precision(): Precision {
    return this.#native.precision as Precision;
  }

  /** The format it was loaded from (`'pth'`, `'safetensors'`), or null if built here. */
  get checkpointFormat(): 'pth' | 'safetensors' | null {
    return this.#native.checkpointFormat as 'pth' | 'safetensors' | null;
  }

  /** Published names and shapes of the trainable parameters, in order. */
  parameterShapes(): Record<string, number[]> {
    return Object.fromEntries(this.#native.parameterShapes().map(({ name, shape }) => [name, shape]));
  }

  /** Logits `[N, numClasses]` of normalised images `[N, inChans, imgSize, imgSize]`, in evaluation mode (no drop path). */
  async forward(images: Tensor): Promise<Tensor> {
    checkImages(images);
    return fromNative((await call(() => this.#native.forward(images.data, images.shape))).tensor!);
  }

  /**
   * The cross-entropy against `labels` (with `labelSmoothing`, as timm's
   * `LabelSmoothingCrossEntropy`) and the gradient of every parameter, in evaluation mode.
   */
  async lossAndGradients(images: Tensor, labels: ArrayLike<number>, options: { labelSmoothing?: number } = {}): Promise<LossAndGradients> {
    checkImages(images);
    const { labelSmoothing = 0 } = options;
    const out = await call(() => this.#native.lossAndGradients(images.data, images.shape, checkLabels(labels), labelSmoothing));
    const gradients: Record<string, Tensor> = {};
    for (const g of out.gradients!) gradients[g.name] = { data: g.data, shape: g.shape };
    return { loss: out.loss!, gradients };
  }

  /**
   * Class probabilities and the top classes of each image: a normalised tensor
   * `[N, inChans, imgSize, imgSize]`, or images as paths, bytes or pixels, made into one
   * batch by `transform` (see {@link preprocess}).
   */
  async predict(images: Tensor | Images, options: { transform?: TransformOptions } = {}): Promise<Prediction> {
    const input = await this.#input(images, options.transform);
    const out = await call(() => this.#native.predict(input.data, input.shape));
    const top5 = out.top!.map((row) => Int32Array.from(row));
    return { top1: Int32Array.from(top5, (row) => row[0]), top5, probabilities: fromNative(out.tensor!) };
  }

  /**
   * Features `[N, embedDim]` for downstream use: what the head sees (pooled, normalised), in
   * evaluation mode. Images given as paths, bytes or pixels are preprocessed by `transform`
   * (see {@link preprocess}) a chunk at a time, so memory stays flat however many there are.
   */
  async embed(images: Tensor | Images, options: { transform?: TransformOptions } = {}): Promise<Tensor> {
    const { imgSize, inChans } = this.#config;
    return embedInChunks(images, imgSize, inChans, options.transform, async (input) => fromNative((await call(() => this.#native.embed(input.data, input.shape))).tensor!));
  }

  /**
   * Dense features of the encoder, as {@link MaskedAutoencoder.featureMaps}: the chosen
   * blocks' outputs as maps `[N, embedDim, H/p, W/p]` (before `norm` / `fc_norm`), at this
   * classifier's image size or any other whose sides are multiples of the patch size.
   */
  async featureMaps(images: Tensor | Images, options: FeatureMapOptions = {}): Promise<FeatureMaps> {
    return featureMapsOf(this.#native, await this.#input(images, options?.transform), options);
  }

  /** `images` as this model's input: a tensor as given, images preprocessed (see {@link preprocess}). */
  #input(images: Tensor | Images, transform: TransformOptions | undefined): Promise<Tensor> {
    return modelInput(images, this.#config.imgSize, this.#config.inChans, transform);
  }

  /** Top-1/top-5 accuracy and loss on a labelled dataset, in one ordered pass (no augmentation). */
  async evaluate(data: DatasetSource, options: PassOptions = {}): Promise<Evaluation> {
    checkNotAborted(options.signal, 'evaluation');
    const group = distributedSpec(options);
    const job = callSync(() => this.#native.evaluate(datasetSpec(data), passSpec(this.#config.inChans, options, options.augment), group));
    const { evaluation } = await runJob(job, 'evaluated', options.signal, forwardProgress(options));
    return evaluation;
  }

  /** The features of every image of a dataset (what `embed` gives), optionally written to `output` as safetensors. */
  async embedDataset(data: DatasetSource, options: PassOptions & { output?: string } = {}): Promise<Embeddings> {
    checkNotAborted(options.signal, 'embedding');
    const output = options.output === undefined ? undefined : checkPath(options.output);
    const group = distributedSpec(options);
    const job = callSync(() => this.#native.embedDataset(datasetSpec(data), passSpec(this.#config.inChans, options, options.augment), output, group));
    await runJob(job, 'embedded', options.signal, forwardProgress(options));
    const e = job.takeEmbeddings()!;
    return { features: fromNative(e.features), labels: e.labels ? Int32Array.from(e.labels) : null, indices: Uint32Array.from(e.indices) };
  }

  /**
   * Trains the classifier in place by one of the paper's protocols, on a native
   * thread: `'finetune'` (AdamW, layer-wise lr decay, drop path, label smoothing,
   * mixup/cutmix), `'linprobe'` (frozen encoder, LARS on the head) or `'partial'`
   * (the last `partialBlocks` blocks, the final norm and the head). Frozen
   * parameters cost no gradient computation.
   *
   * The run has the classifier to itself until its last event: meanwhile every
   * other call on it is refused with `E_BUSY`, and the getters still answer.
   */
  finetune(options: FinetuneOptions): TrainingRun {
    if (typeof options !== 'object' || options === null) throw new VitMaeError('E_ARGUMENT', 'finetune needs an options object');
    // As in pre-training: the rest is the recipe, whose unknown keys the native side refuses.
    const { data, evalData, augment = FINETUNE_AUGMENT, signal, onProgress, resume, betas, protocol = 'finetune', labelSmoothing, batchSize, workers, prefetch, skipCorrupt, distributed, distributedTimeout, ...recipe } = options;
    checkNotAborted(signal, 'fine-tuning');
    if (!PROTOCOLS.includes(protocol)) throw new VitMaeError('E_ARGUMENT', `protocol must be one of ${PROTOCOLS.join(', ')}, got ${String(protocol)}`);
    checkRecipeKeys(recipe, 'fine-tuning', { beta1: 'betas', beta2: 'betas', smoothing: 'labelSmoothing' });
    const seed = checkSeed(recipe.seed);
    const config = { ...recipe, protocol, ...betaFields(betas), smoothing: labelSmoothing, seed };
    const channels = this.#config.inChans;
    const loaderOptions = { batchSize, workers, prefetch, skipCorrupt };
    const training = { ...FINETUNE_AUGMENT, ...augment };
    const loader = loaderSpec(channels, seed, loaderOptions, training, true);
    const evalSpec = evalData === undefined ? undefined : datasetSpec(evalData);
    const evalLoader = evalData === undefined ? undefined : passSpec(channels, loaderOptions, { ...training, cropFraction: cropFraction(training) });
    const group = distributedSpec({ distributed, distributedTimeout });
    const native = callSync(() => this.#native.finetune(datasetSpec(data), loader, evalSpec, evalLoader, optionsJson(config, 'E_ARGUMENT'), resume, group));
    return new TrainingRun(native, onProgress, signal);
  }

  /** Saves as safetensors in the published key layout with the config in `__metadata__.config`, atomically. */
  async save(path: string): Promise<void> {
    const checkedPath = checkPath(path);
    await call(() => this.#native.save(checkedPath));
  }
}

function checkLabels(labels: ArrayLike<number>): number[] {
  if (labels === null || typeof labels !== 'object' || typeof labels.length !== 'number') {
    throw new VitMaeError('E_ARGUMENT', 'labels must be an array of class indices');
  }
  const out = Array.from(labels);
  if (!out.every((y) => Number.isInteger(y))) throw new VitMaeError('E_ARGUMENT', 'labels must be integers');
  return out;
}
