// Argument checks and types shared by the model classes.
import { VitMaeError } from './errors.js';
import { call, type Binding } from './native.js';
import { checkTensor, type Tensor } from './tensor.js';
import type { LoaderOptions, PassAugment } from './data.js';
import type { StartedEvent } from './train.js';
import type { TransformOptions } from './images.js';

/**
 * How a training run or a pass over a dataset works with the other processes of an
 * MPI job (`mpirun -np 4 node train.js`, or Slurm's `srun`): each process is a rank,
 * trains on its shard of the data and averages gradients with the others every step.
 */
export interface DistributedOptions {
  /**
   * `'auto'` (default): join the MPI job this process was launched in, if any, else work
   * alone. `'mpi'`: join MPI even as a single process, failing with `E_DISTRIBUTED` when
   * it cannot be loaded. `'none'`: work alone, even under a launcher.
   */
  distributed?: 'auto' | 'mpi' | 'none';
  /**
   * Seconds a rank waits for the others at a collective (gradient average, agreement
   * after a step) before failing with `E_DISTRIBUTED`: a rank that died or hangs stops
   * the others within this time. Default 300.
   */
  distributedTimeout?: number;
}

const DISTRIBUTED_KINDS = ['auto', 'mpi', 'none'];
const DEFAULT_DISTRIBUTED_TIMEOUT_S = 300;

/** The binding's distributed options from the facade's. */
export function distributedSpec({ distributed = 'auto', distributedTimeout = DEFAULT_DISTRIBUTED_TIMEOUT_S }: DistributedOptions): Binding.NativeDistributedOptions {
  if (!DISTRIBUTED_KINDS.includes(distributed)) {
    throw new VitMaeError('E_ARGUMENT', `distributed must be one of ${DISTRIBUTED_KINDS.join(', ')}, got ${String(distributed)}`);
  }
  if (typeof distributedTimeout !== 'number' || !Number.isFinite(distributedTimeout) || distributedTimeout <= 0) {
    throw new VitMaeError('E_ARGUMENT', `distributedTimeout must be a number of seconds above 0, got ${String(distributedTimeout)}`);
  }
  return { kind: distributed, timeoutSeconds: distributedTimeout };
}

/** Options for one ordered pass over a dataset (evaluation, embedding): no shuffling or augmentation. */
export interface PassOptions extends LoaderOptions, DistributedOptions {
  /** Padding, central-crop fraction and normalisation, as in training. */
  augment?: PassAugment;
  /** Cancels the pass; the promise rejects with `E_ABORTED`. */
  signal?: AbortSignal;
  /** Called after every batch with the images done and the total. */
  onProgress?: (done: number, total: number) => void;
  /** Called once the pass has started, with this process's rank among those sharing the pass (see {@link DistributedOptions}). */
  onStarted?: (event: StartedEvent) => void;
}

/** The features of a dataset, in dataset order. */
export interface Embeddings {
  /** `[N, D]`. */
  features: Tensor;
  /** The class of each image, or null for an unlabelled dataset. */
  labels: Int32Array | null;
  /** The dataset index of each row. */
  indices: Uint32Array;
}

export function checkSeed(seed: unknown): number {
  if (seed === undefined) return 0;
  if (typeof seed !== 'number' || !Number.isSafeInteger(seed) || seed < 0) {
    throw new VitMaeError('E_ARGUMENT', `seed must be a non-negative integer, got ${String(seed)}`);
  }
  return seed;
}

/**
 * Checks what a training call passes on to the native recipe, whose own check refuses
 * unknown keys, for the two kinds of key that check cannot see: a function (JSON drops
 * it, so a misspelt callback such as `onProgres` would vanish) and a native name that the
 * facade spells otherwise (`renamed`: native name to the option's), which the facade's
 * value would overwrite unseen.
 */
export function checkRecipeKeys(recipe: object, what: string, renamed: Record<string, string>): void {
  for (const [key, value] of Object.entries(recipe)) {
    if (key in renamed) throw new VitMaeError('E_ARGUMENT', `unknown ${what} option '${key}' (the option is '${renamed[key]}')`);
    if (typeof value === 'function') throw new VitMaeError('E_ARGUMENT', `unknown ${what} option '${key}'`);
  }
}

/** The largest size or count the addon takes (its integers are 32-bit unsigned). */
const MAX_NATIVE_INTEGER = 0xffffffff;

/** `value` when it is an integer from `min` to 2^32 - 1; otherwise `E_ARGUMENT` naming `name` and the value. */
export function checkInteger(value: unknown, name: string, min: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > MAX_NATIVE_INTEGER) {
    throw new VitMaeError('E_ARGUMENT', `${name} must be an integer from ${min} to ${MAX_NATIVE_INTEGER}, got ${String(value)}`);
  }
  return value;
}

/**
 * The native recipe's `beta1` and `beta2` from the `betas` option: none when it is absent
 * (the recipe's defaults), else a pair of numbers (the native side checks their range).
 */
export function betaFields(betas: unknown): { beta1?: number; beta2?: number } {
  if (betas === undefined) return {};
  if (!Array.isArray(betas) || betas.length !== 2 || !betas.every((b) => typeof b === 'number')) {
    throw new VitMaeError('E_ARGUMENT', `betas must be a pair of numbers [beta1, beta2], got ${JSON.stringify(betas)}`);
  }
  const [beta1, beta2] = betas as [number, number];
  return { beta1, beta2 };
}

export function checkDevice(device: unknown): string {
  if (device === undefined) return 'auto';
  if (typeof device !== 'string') throw new VitMaeError('E_ARGUMENT', `device must be a string, got ${typeof device}`);
  return device;
}

export function checkPrecision(precision: unknown): string {
  if (precision === undefined) return 'f32';
  if (precision !== 'f32' && precision !== 'bf16') {
    throw new VitMaeError('E_ARGUMENT', `precision must be 'f32' or 'bf16', got ${JSON.stringify(precision)}`);
  }
  return precision;
}

/**
 * Options or a config as the JSON the native side reads. JSON has no NaN or
 * Infinity (`JSON.stringify` writes null, which would silently mean "the
 * default"), so a non-finite number is an error with `code` that names its field.
 */
export function optionsJson(options: object, code: 'E_ARGUMENT' | 'E_CONFIG'): string {
  return JSON.stringify(options, (key, value: unknown) => {
    if (typeof value === 'number' && !Number.isFinite(value)) throw new VitMaeError(code, `${key || 'value'} must be a finite number, got ${value}`);
    return value;
  });
}

export function configJson(config: unknown): string | undefined {
  if (config === undefined) return undefined;
  if (typeof config !== 'object' || config === null || Array.isArray(config)) {
    throw new VitMaeError('E_CONFIG', 'config must be an object of config fields');
  }
  return optionsJson(config, 'E_CONFIG');
}

export function checkPath(path: unknown): string {
  if (typeof path !== 'string' || path.length === 0) {
    throw new VitMaeError('E_ARGUMENT', 'path must be a non-empty string');
  }
  return path;
}

export function fromNative(t: Binding.NativeTensor): Tensor {
  return { data: t.data, shape: t.shape };
}

/** Refuses work (a pass, a training run) whose signal is already aborted, before it starts. */
export function checkNotAborted(signal: AbortSignal | undefined, what: string): void {
  if (signal?.aborted) throw new VitMaeError('E_ABORTED', `${what} was aborted before it started`);
}

/** Options of `featureMaps`: dense features for detection and segmentation. */
export interface FeatureMapOptions {
  /**
   * The encoder blocks whose outputs become maps, 0-based, in the order wanted; negative
   * indices count from the end. Default `[-1]`, the last block (as ViTDet). A block out of
   * range is refused with `E_ARGUMENT`.
   */
  layers?: number[];
  /** Also resample the last map into the simple feature pyramid ({@link FeatureMaps.pyramid}). Default false. */
  pyramid?: boolean;
  /** How images given as paths, bytes or pixels become the model input, at the model's own size (not for a tensor). */
  transform?: TransformOptions;
}

/** Dense features of a batch of images `[N, C, H, W]`, H and W multiples of the patch size `p`. */
export interface FeatureMaps {
  /**
   * One map `[N, embedDim, H/p, W/p]` per entry of `layers`, row-major: the block's output
   * tokens without the cls token and without the encoder's final norm, the token of
   * patch row `i`, column `j` at `[n, :, i, j]`.
   */
  maps: Tensor[];
  /**
   * With `pyramid`: the last map at 4x, 2x, 1x and 1/2 its size, finest first (strides
   * p/4, p/2, p and 2p: 4, 8, 16 and 32 at patch 16), by nearest-neighbour upsampling and
   * a 2x2 max-pool with stride 2 (odd sides floored). This is ViTDet's simple feature
   * pyramid without its learnable layers, which a detector adds and trains. Else null.
   */
  pyramid: Tensor[] | null;
}

/** `featureMaps` of either model: the options checked, the maps of its native model. */
export async function featureMapsOf(native: Pick<Binding.NativeMae, 'featureMaps'>, images: Tensor, options: FeatureMapOptions): Promise<FeatureMaps> {
  checkTensor(images, 'images', 'E_SHAPE');
  if (typeof options !== 'object' || options === null) throw new VitMaeError('E_ARGUMENT', 'featureMaps options must be an object');
  const { layers = [-1], pyramid = false } = options;
  if (!Array.isArray(layers) || layers.length === 0 || !layers.every((l) => Number.isSafeInteger(l))) {
    throw new VitMaeError('E_ARGUMENT', `layers must be a non-empty array of block indices (integers, negative from the end), got ${JSON.stringify(layers)}`);
  }
  if (typeof pyramid !== 'boolean') throw new VitMaeError('E_ARGUMENT', `pyramid must be a boolean, got ${String(pyramid)}`);
  const m = await call(() => native.featureMaps(images.data, images.shape, layers, pyramid));
  return { maps: m.maps.map(fromNative), pyramid: m.pyramid ? m.pyramid.map(fromNative) : null };
}

/**
 * Warns (a Node process warning, `VIT_MAE_IGNORED_CONFIG_FIELDS`) when the checkpoint at
 * `path` was a Hugging Face folder whose `config.json` has fields the model does not follow.
 */
export function warnIgnoredConfigFields(native: Pick<Binding.NativeMae, 'ignoredConfigFields'>, path: string): void {
  const ignored = native.ignoredConfigFields;
  if (ignored.length === 0) return;
  process.emitWarning(`${path}: config.json fields not followed: ${ignored.join(', ')}`, { type: 'VitMaeWarning', code: 'VIT_MAE_IGNORED_CONFIG_FIELDS' });
}
