/**
 * vit-mae: masked autoencoders (ViT-MAE, He et al. 2021) for Node, on a Rust core
 * that matches the published PyTorch code.
 *
 * @packageDocumentation
 */
import type { MaeConfig, PresetName, Device, Precision } from './config.js';
import { VitMaeError } from './errors.js';
import { binding, call, callSync, maeNatives, type Binding } from './native.js';
import { warnIgnoredConfigFields, betaFields, checkDevice, checkInteger, checkNotAborted, checkPath, checkPrecision, checkRecipeKeys, checkSeed, configJson, distributedSpec, featureMapsOf, fromNative, optionsJson, type Embeddings, type FeatureMapOptions, type FeatureMaps, type PassOptions } from './common.js';
import { forwardProgress, runJob } from './train.js';
import { checkTensor, type Tensor } from './tensor.js';
import { cropMode, datasetSpec, loaderSpec, normalisation, passSpec, type AugmentOptions, type DatasetSource } from './data.js';
import { TrainingRun, type PretrainOptions } from './train.js';
import { embedInChunks, modelInput, type Images, type TransformOptions } from './images.js';

export type { EncoderConfig, MaeConfig, ClassifierConfig, PresetName, Device, Precision, Target } from './config.js';
export type { DistributedOptions, Embeddings, FeatureMapOptions, FeatureMaps, PassOptions } from './common.js';
export {
  VitClassifier,
  type FromPretrainedOptions,
  type ClassifierLoadOptions,
  type Prediction,
  type Evaluation,
  type Protocol,
  type FinetuneOptions,
} from './classifier.js';
export { VitMaeError, ERROR_CODES, type ErrorCode } from './errors.js';
export { nativeBackend, type NativeBackend } from './native.js';
export type { Tensor } from './tensor.js';
export { preprocess, type ImageInput, type Images, type RawPixels, type TransformOptions, type PreprocessOptions } from './images.js';
export {
  IMAGENET_MEAN,
  IMAGENET_STD,
  FASHION_MNIST_MEAN,
  FASHION_MNIST_STD,
  type DatasetSource,
  type FolderSource,
  type IdxSource,
  type MemorySource,
  PUBLISHED_CROP_FRACTION,
  type AugmentOptions,
  type CropMode,
  type PassAugment,
  type LoaderOptions,
} from './data.js';
export {
  TrainingRun,
  type PretrainOptions,
  type RecipeOptions,
  type TrainingEvent,
  type StartedEvent,
  type StepEvent,
  type CheckpointEvent,
  type SkippedEvent,
  type EpochEndEvent,
  type EvalEvent,
  type PcaBasisEvent,
  type TrainingSummary,
} from './train.js';

/**
 * How the removed patches are chosen (the strategies of the paper's Table 1f):
 * `'random'` (published; argsort of per-sample noise), `'block'` (BEiT-style
 * blocks) or `'grid'` (keep one patch of every 2x2; ratio fixed at 0.75).
 */
export type MaskingStrategy = 'random' | 'block' | 'grid';

/** Options for a forward pass. */
export interface ForwardOptions {
  /** Fraction of patches removed, in [0, 1). Default 0.75. */
  maskRatio?: number;
  /**
   * Per-sample noise `[N, L]` for random masking: the patches with the smallest
   * noise stay visible. Without it, noise comes from the model's seeded RNG.
   */
  noise?: Tensor;
  /** Masking strategy. Default `'random'`. */
  masking?: MaskingStrategy;
  /** How images given as paths, bytes or pixels become the model input (not for a tensor). */
  transform?: TransformOptions;
}

/** What a forward pass returns: the published `(loss, pred, mask)` and more. */
export interface ForwardOutput {
  /** Mean squared error over the removed patches (0 when nothing is removed). */
  loss: number;
  /** Predicted patches `[N, L, p*p*C]`, each in (row, column, channel) order. */
  pred: Tensor;
  /** `[N, L]`: 1 where a patch was removed, 0 where it was visible. */
  mask: Tensor;
  /** `[N, L]`: each patch's position in the shuffled order (integers). */
  idsRestore: Tensor;
  /** Encoder output after its final norm `[N, 1 + visible, embedDim]` (cls token first). */
  latent: Tensor;
}

/** The loss and the gradient of every trainable parameter. */
export interface LossAndGradients {
  /** The same loss `forward` returns. */
  loss: number;
  /**
   * Gradients keyed by published parameter name (`blocks.0.attn.qkv.weight`, ...),
   * in the published order. The fixed position embeddings have none.
   */
  gradients: Record<string, Tensor>;
}

/** The published visualisation of a forward pass, all `[N, C, H, W]` in the images' normalised space. */
export interface Reconstruction {
  /** The loss of the forward pass. */
  loss: number;
  /** `[N, L]`: 1 where a patch was removed. */
  mask: Tensor;
  /** The input with the removed patches zeroed. */
  masked: Tensor;
  /** The prediction in pixel space (for `normPixLoss` models, mapped back with each patch's own mean and std; for `'pca'` targets, the coefficients through the basis: `coef @ components + mean`). */
  reconstruction: Tensor;
  /** The visible patches pasted onto the prediction. */
  pasted: Tensor;
  /** The model input: the tensor given, or the images preprocessed (the grid's originals). */
  input: Tensor;
}

/** Options for {@link MaskedAutoencoder.create}. */
export interface CreateOptions {
  /** A built-in configuration to start from. */
  preset?: PresetName;
  /** A full config, or, with `preset`, the fields that differ from it. */
  config?: Partial<MaeConfig>;
  /** Seed for the initial weights and for masks drawn without explicit noise. Default 0. */
  seed?: number;
  /** Where to compute. Default `'auto'`: a working GPU, else the CPU. */
  device?: Device;
  /** What to compute in. Default `'f32'`. */
  precision?: Precision;
}

/** Options for {@link MaskedAutoencoder.load}. */
export interface LoadOptions {
  /**
   * Config fields to use instead of what the checkpoint holds or implies. Needed
   * for `.pth` files whose head counts are not those of a preset (a state dict's
   * shapes do not tell them). The checkpoint's shapes are checked against it.
   */
  config?: Partial<MaeConfig>;
  /** Seed for a freshly initialised decoder and for masks. Default 0. */
  seed?: number;
  /** Where to compute. Default `'auto'`: a working GPU, else the CPU. */
  device?: Device;
  /** What to compute in. Default `'f32'`. */
  precision?: Precision;
}

const MASKINGS: readonly MaskingStrategy[] = ['random', 'block', 'grid'];

function maskOptions(options: ForwardOptions = {}): Binding.NativeMaskOptions {
  const { maskRatio = 0.75, masking = 'random', noise } = options;
  if (typeof maskRatio !== 'number' || !Number.isFinite(maskRatio)) {
    throw new VitMaeError('E_MASK_RATIO', `maskRatio must be a number in [0, 1), got ${String(maskRatio)}`);
  }
  if (!MASKINGS.includes(masking)) {
    throw new VitMaeError('E_ARGUMENT', `masking must be one of ${MASKINGS.join(', ')}, got ${String(masking)}`);
  }
  if (noise === undefined) return { maskRatio, masking };
  checkTensor(noise, 'noise', 'E_NOISE');
  return { maskRatio, masking, noise: noise.data, noiseShape: noise.shape };
}

/**
 * Lets f32 matrix products on CUDA use TF32 tensor cores (inputs rounded to 10-bit
 * mantissas, f32 accumulation) for the whole process, as PyTorch's
 * `torch.backends.cuda.matmul.allow_tf32`. Off by default; no effect on the CPU or
 * on bf16 models.
 */
export function setAllowTf32(allow: boolean): void {
  if (typeof allow !== 'boolean') throw new VitMaeError('E_ARGUMENT', `setAllowTf32 takes a boolean, got ${typeof allow}`);
  binding.setAllowTf32(allow);
}

/** What a checkpoint holds, read without building a model ({@link inspectCheckpoint}). */
export interface CheckpointInspection {
  format: 'safetensors' | 'pth' | 'huggingface';
  /** Every tensor's shape, by published name. */
  tensors: Record<string, number[]>;
  /** The config fields the file tells: its metadata, over what its shapes imply. */
  config: Partial<MaeConfig>;
  /**
   * The fields a model needs that the file does not tell (a `.pth` of widths no
   * preset has does not tell its head counts): pass them as `config` to
   * {@link MaskedAutoencoder.load}.
   */
  unknown: (keyof MaeConfig)[];
}

/** Reads what a checkpoint (`.safetensors`, `.pth` or a Hugging Face folder) holds, without building a model. */
export async function inspectCheckpoint(path: string): Promise<CheckpointInspection> {
  const checkedPath = checkPath(path);
  const i = await call(() => binding.inspectCheckpoint(checkedPath));
  return {
    format: i.format as CheckpointInspection['format'],
    tensors: Object.fromEntries(i.tensors.map(({ name, shape }) => [name, shape])),
    config: JSON.parse(i.configJson) as Partial<MaeConfig>,
    unknown: i.unknown as (keyof MaeConfig)[],
  };
}

/**
 * Loads `count` images of a dataset (from index `start`, a multiple of `count`),
 * resized to the model's input and normalised: ready for `forward` or `reconstruct`.
 * Sizes and counts are integers (`imgSize`, `inChans`, `count` at least 1, `start` at
 * least 0), else `E_ARGUMENT`; images that would not fit in memory are refused with
 * `E_OUT_OF_MEMORY` before any is loaded.
 */
export async function loadImages(
  source: DatasetSource,
  options: { imgSize: number; inChans: number; count: number; start?: number; augment?: AugmentOptions },
): Promise<Tensor> {
  if (typeof options !== 'object' || options === null) throw new VitMaeError('E_ARGUMENT', 'loadImages needs options with imgSize, inChans and count');
  const { augment = {} } = options;
  const imgSize = checkInteger(options.imgSize, 'imgSize', 1);
  const inChans = checkInteger(options.inChans, 'inChans', 1);
  const count = checkInteger(options.count, 'count', 1);
  const start = checkInteger(options.start ?? 0, 'start', 0);
  const loader = loaderSpec(inChans, 0, { batchSize: count, workers: 1, prefetch: 1, skipCorrupt: false }, { hflip: false, ...augment, crop: cropMode(augment, 'center'), randomResizedCrop: undefined }, false);
  return fromNative(await call(() => binding.loadImages(datasetSpec(source), loader, imgSize, inChans, start, count)));
}

/** How {@link encodeReconstructionGrid} and {@link writeReconstructionGrid} map pixels back. */
export interface GridOptions {
  mean?: number[];
  std?: number[];
}

/**
 * A PNG grid of a reconstruction, as the file's bytes (for a web response, say), one
 * row per image: masked | reconstruction | reconstruction + visible | original.
 * `originals` defaults to the reconstruction's own input. `mean` and `std` map the
 * normalised pixels back (defaults as {@link AugmentOptions}). Every tensor is
 * `[N, C, H, W]` of one shape, else `E_SHAPE` naming the one that is not.
 */
export async function encodeReconstructionGrid(reconstruction: Reconstruction, originals?: Tensor, options: GridOptions = {}): Promise<Buffer> {
  return reconstructionGrid(null, reconstruction, originals, options);
}

/** Writes {@link encodeReconstructionGrid}'s PNG to `path` (whole or not at all). */
export async function writeReconstructionGrid(path: string, reconstruction: Reconstruction, originals?: Tensor, options: GridOptions = {}): Promise<void> {
  await reconstructionGrid(checkPath(path), reconstruction, originals, options);
}

async function reconstructionGrid(path: string | null, reconstruction: Reconstruction, originals: Tensor | undefined, options: GridOptions): Promise<Buffer> {
  if (typeof reconstruction !== 'object' || reconstruction === null) throw new VitMaeError('E_ARGUMENT', 'reconstruction must be what reconstruct() returns');
  originals ??= reconstruction.input;
  const columns = { 'reconstruction.masked': reconstruction.masked, 'reconstruction.reconstruction': reconstruction.reconstruction, 'reconstruction.pasted': reconstruction.pasted, originals };
  for (const [name, tensor] of Object.entries(columns)) {
    checkTensor(tensor, name, 'E_SHAPE');
    if (tensor.shape.length !== 4) throw new VitMaeError('E_SHAPE', `${name} must be [N, C, H, W], got [${tensor.shape.join(', ')}]`);
  }
  const { mean, std } = normalisation(originals.shape[1], options);
  return call(() => binding.reconstructionGrid(path, reconstruction.masked, reconstruction.reconstruction, reconstruction.pasted, originals, mean, std));
}

/**
 * A ViT masked autoencoder: encoder on the visible patches, light decoder,
 * MSE on the removed patches, as `models_mae.py`.
 *
 * ```ts
 * const mae = MaskedAutoencoder.create({ preset: 'mae_vit_base_patch16', seed: 0 });
 * const out = await mae.forward(images, { maskRatio: 0.75 });
 * ```
 */
export class MaskedAutoencoder {
  readonly #native: Binding.NativeMae;
  readonly #config: Readonly<MaeConfig>;

  private constructor(native: Binding.NativeMae) {
    this.#native = native;
    maeNatives.set(this, native);
    this.#config = Object.freeze(JSON.parse(native.configJson) as MaeConfig);
  }

  /**
   * A freshly initialised model, as published: xavier-uniform linear layers and
   * patch embedding, normal(0.02) cls and mask tokens, fixed 2-D sin-cos position
   * embeddings. Runs synchronously (allocating the weights).
   */
  static create(options: CreateOptions = {}): MaskedAutoencoder {
    const { preset, config, seed, device, precision } = options;
    if (preset === undefined && config === undefined) {
      throw new VitMaeError('E_CONFIG', 'create needs a preset, a config, or both');
    }
    if (preset !== undefined && typeof preset !== 'string') {
      throw new VitMaeError('E_CONFIG', 'preset must be a preset name');
    }
    const native = callSync(() => binding.NativeMae.create(preset, configJson(config), checkSeed(seed), checkDevice(device), checkPrecision(precision)));
    return new MaskedAutoencoder(native);
  }

  /**
   * Loads a checkpoint: a published `.pth` (`{"model": state_dict}`, read without
   * running any code from it), a `.safetensors` file in the published key layout
   * (config from `__metadata__.config` when present), or a Hugging Face
   * `ViTMAEForPreTraining` or `ViTMAEModel` folder. An encoder-only checkpoint (a
   * `ViTMAEModel` folder is one) loads with a freshly initialised decoder and
   * {@link MaskedAutoencoder.freshDecoder} set; fields of a Hugging Face config that
   * are not followed are listed in {@link MaskedAutoencoder.ignoredConfigFields} and in a
   * process warning (`VitMaeWarning`, code `VIT_MAE_IGNORED_CONFIG_FIELDS`).
   */
  static async load(path: string, options: LoadOptions = {}): Promise<MaskedAutoencoder> {
    const { config, seed, device, precision } = options;
    const checkedPath = checkPath(path);
    const native = await call(() => binding.NativeMae.load(checkedPath, configJson(config), checkSeed(seed), checkDevice(device), checkPrecision(precision)));
    warnIgnoredConfigFields(native, checkedPath);
    return new MaskedAutoencoder(native);
  }

  /** The names of the built-in presets with their configs. */
  static presets(): Record<PresetName, MaeConfig> {
    return Object.fromEntries(binding.presets().map(([name, json]) => [name, JSON.parse(json)])) as Record<PresetName, MaeConfig>;
  }

  /** The model's configuration. */
  get config(): Readonly<MaeConfig> {
    return this.#config;
  }

  /**
   * Frees the native weights now, rather than when the garbage collector gets to this
   * object. A call already computing finishes first (the weights go when it does); one
   * still queued, and every later call, rejects or throws with `E_DISPOSED`. The
   * getters still answer.
   * Throws `E_BUSY` while the model trains. Calling it again does nothing. Also
   * available as `using` (`Symbol.dispose`).
   */
  dispose(): void {
    callSync(() => this.#native.dispose());
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  /** The number of trainable values (position embeddings excluded, as they are fixed). */
  get parameterCount(): number {
    return this.#native.parameterCount;
  }

  /** True when the model was loaded from an encoder-only checkpoint and its decoder is freshly initialised. */
  get freshDecoder(): boolean {
    return this.#native.freshDecoder;
  }

  /** The format the model was loaded from (`'pth'`, `'safetensors'`, `'huggingface'`), or null if created. */
  get checkpointFormat(): 'pth' | 'safetensors' | 'huggingface' | null {
    return this.#native.checkpointFormat as 'pth' | 'safetensors' | 'huggingface' | null;
  }

  /**
   * The weights the checkpoint stored in another floating-point type, by their names in the
   * file, with that type; they were converted to f32 on loading. Empty for an f32 checkpoint
   * or a created model.
   */
  get convertedDtypes(): Readonly<Record<string, 'f16' | 'bf16' | 'f64'>> {
    return this.#native.convertedDtypes as Record<string, 'f16' | 'bf16' | 'f64'>;
  }

  /**
   * The warning a Hugging Face folder can carry: the fields of its `config.json` that
   * describe the model but were not followed (not read, and not at a value this MAE
   * follows anyway, such as a `mask_ratio` other than 0.75, dropout, or a field of a newer
   * Transformers), sorted. Empty for other formats or a created model. Fields that would
   * change what the model computes and cannot be followed (`hidden_act` other than
   * `'gelu'`, `qkv_bias: false`) fail the load with `E_CONFIG` instead.
   */
  get ignoredConfigFields(): readonly string[] {
    return this.#native.ignoredConfigFields;
  }

  /** Where the model computes (`'cpu'`, `'cuda:0'`, ...). */
  get device(): string {
    return this.#native.device;
  }

  /** What the model computes in. */
  get precision(): Precision {
    return this.#native.precision as Precision;
  }

  /** Published names and shapes of the trainable parameters, in order. */
  parameterShapes(): Record<string, number[]> {
    return Object.fromEntries(this.#native.parameterShapes().map(({ name, shape }) => [name, shape]));
  }

  /**
   * The published forward pass on normalised images `[N, inChans, imgSize, imgSize]`.
   * Runs off the JS thread.
   */
  async forward(images: Tensor | Images, options?: ForwardOptions): Promise<ForwardOutput> {
    const mask = maskOptions(options);
    const input = await this.#input(images, options?.transform);
    const out = await call(() => this.#native.forward(input.data, input.shape, mask));
    return {
      loss: out.loss,
      pred: fromNative(out.pred),
      mask: fromNative(out.mask),
      idsRestore: fromNative(out.idsRestore),
      latent: fromNative(out.latent),
    };
  }

  /** The loss of a forward pass and the gradient of every trainable parameter. Runs off the JS thread. */
  async lossAndGradients(images: Tensor | Images, options?: ForwardOptions): Promise<LossAndGradients> {
    const mask = maskOptions(options);
    const input = await this.#input(images, options?.transform);
    const out = await call(() => this.#native.lossAndGradients(input.data, input.shape, mask));
    const gradients: Record<string, Tensor> = {};
    for (const g of out.gradients) gradients[g.name] = { data: g.data, shape: g.shape };
    return { loss: out.loss, gradients };
  }

  /**
   * Reconstructs images as the paper's Figure 2: the masked input, the
   * reconstruction, and the reconstruction with the visible patches pasted back.
   */
  async reconstruct(images: Tensor | Images, options?: ForwardOptions): Promise<Reconstruction> {
    const mask = maskOptions(options);
    const input = await this.#input(images, options?.transform);
    const r = await call(() => this.#native.reconstruct(input.data, input.shape, mask));
    return { loss: r.loss, mask: fromNative(r.mask), masked: fromNative(r.masked), reconstruction: fromNative(r.reconstruction), pasted: fromNative(r.pasted), input };
  }

  /**
   * Pre-trains the model in place (the published recipe by default), on a native
   * thread. Iterate the returned run for progress events; await `run.result`
   * for the summary.
   *
   * The run has the model to itself until its last event: meanwhile every other
   * call on the model (a forward pass, `save`, a second run) is refused with
   * `E_BUSY`, and the getters still answer. Checkpoints are the way to look at the
   * weights mid-run.
   *
   * ```ts
   * const run = mae.pretrain({ data: { kind: 'folder', path: 'images/' }, epochs: 10, checkpointDir: 'ckpt' });
   * for await (const e of run) if (e.type === 'step') console.log(e.step, e.loss);
   * const summary = await run.result;
   * ```
   */
  pretrain(options: PretrainOptions): TrainingRun {
    if (typeof options !== 'object' || options === null) throw new VitMaeError('E_ARGUMENT', 'pretrain needs an options object');
    // What is not the data, the loader or the run's own plumbing is the recipe; the
    // native side refuses a key it does not know, so a misspelt option is an error
    // rather than a run with the default.
    const { data, augment = {}, signal, onProgress, resume, betas, batchSize, workers, prefetch, skipCorrupt, distributed, distributedTimeout, ...recipe } = options;
    checkNotAborted(signal, 'pre-training');
    checkRecipeKeys(recipe, 'pre-training', { beta1: 'betas', beta2: 'betas' });
    const seed = checkSeed(recipe.seed);
    const config = { ...recipe, ...betaFields(betas), seed };
    const loader = loaderSpec(this.#config.inChans, seed, { batchSize, workers, prefetch, skipCorrupt }, augment, true);
    const group = distributedSpec({ distributed, distributedTimeout });
    const native = callSync(() => this.#native.pretrain(datasetSpec(data), loader, optionsJson(config, 'E_ARGUMENT'), resume, group));
    return new TrainingRun(native, onProgress, signal);
  }

  /**
   * Features `[N, embedDim]` of whole images: the encoder over every patch (no
   * masking), after its final norm, pooled as the mean of the patch tokens (default)
   * or the cls token.
   */
  async embed(images: Tensor | Images, options: { pool?: 'mean' | 'cls'; transform?: TransformOptions } = {}): Promise<Tensor> {
    const pool = options.pool ?? 'mean';
    const { imgSize, inChans } = this.#config;
    return embedInChunks(images, imgSize, inChans, options.transform, async (input) => fromNative(await call(() => this.#native.embed(input.data, input.shape, pool))));
  }

  /**
   * Dense features for detection and segmentation (the paper's Tables 4-5, through
   * ViTDet): the encoder over every patch (no masking) of images `[N, C, H, W]` of this
   * model's size or any other whose sides are multiples of the patch size (the position
   * embedding then resized bicubically, as the published `interpolate_pos_embed`), the
   * outputs of the chosen blocks as maps `[N, embedDim, H/p, W/p]`. See {@link FeatureMaps}.
   */
  async featureMaps(images: Tensor | Images, options: FeatureMapOptions = {}): Promise<FeatureMaps> {
    return featureMapsOf(this.#native, await this.#input(images, options?.transform), options);
  }

  /** The features (as {@link MaskedAutoencoder.embed}) of every image of a dataset, optionally written to `output` as safetensors. */
  async embedDataset(data: DatasetSource, options: PassOptions & { pool?: 'mean' | 'cls'; output?: string } = {}): Promise<Embeddings> {
    checkNotAborted(options.signal, 'embedding');
    const output = options.output === undefined ? undefined : checkPath(options.output);
    const spec = passSpec(this.#config.inChans, options, options.augment);
    const group = distributedSpec(options);
    const job = callSync(() => this.#native.embedDataset(datasetSpec(data), spec, options.pool ?? 'mean', output, group));
    await runJob(job, 'embedded', options.signal, forwardProgress(options));
    const e = job.takeEmbeddings()!;
    return { features: fromNative(e.features), labels: e.labels ? Int32Array.from(e.labels) : null, indices: Uint32Array.from(e.indices) };
  }

  /** `images` as this model's input: a tensor as given, images preprocessed (see {@link preprocess}). */
  #input(images: Tensor | Images, transform: TransformOptions | undefined): Promise<Tensor> {
    return modelInput(images, this.#config.imgSize, this.#config.inChans, transform);
  }

  /**
   * Saves the model as safetensors in the published key layout with the config in
   * `__metadata__.config`. The write is atomic: the file is complete or untouched.
   */
  async save(path: string): Promise<void> {
    const checkedPath = checkPath(path);
    await call(() => this.#native.save(checkedPath));
  }
}
