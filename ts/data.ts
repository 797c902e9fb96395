import { VitMaeError } from './errors.js';
import type { Binding } from './native.js';
import { checkTensor, type Tensor } from './tensor.js';
import { checkInteger } from './common.js';

/**
 * Where training images come from:
 * - `{ kind: 'folder', path }`: a folder of images (JPEG, PNG, GIF, BMP, WebP, TIFF),
 *   searched recursively; `class/xxx.jpg` sub-folders give labels.
 * - `{ kind: 'idx', path, labelsPath? }`: the IDX format of MNIST and Fashion-MNIST (gzip or plain).
 * - `{ kind: 'memory', images, labels? }`: images `[N, C, H, W]` with values in [0, 1].
 */
export type DatasetSource = FolderSource | IdxSource | MemorySource;

/** A folder of images, searched recursively; `class/xxx.jpg` sub-folders give labels. */
export interface FolderSource {
  /** Which kind of source this is. */
  kind: 'folder';
  /** The folder. */
  path: string;
}

/** Images in the IDX format of MNIST and Fashion-MNIST (gzip or plain). */
export interface IdxSource {
  /** Which kind of source this is. */
  kind: 'idx';
  /** The images file (`*-images-idx3-ubyte[.gz]`). */
  path: string;
  /** The labels file (`*-labels-idx1-ubyte[.gz]`), if any. */
  labelsPath?: string;
}

/** Images already in memory. */
export interface MemorySource {
  /** Which kind of source this is. */
  kind: 'memory';
  /** `[N, C, H, W]` with values in [0, 1]. */
  images: Tensor;
  /** One class index per image, if labelled. */
  labels?: ArrayLike<number>;
}

/**
 * The crops of the MAE paper's Table 1e: `'center'` ("none": the central square, for
 * evaluation and training without crop augmentation), `'fixed'` ("crop, fixed size": a
 * square of {@link AugmentOptions.cropFraction} of the shorter side at a random place,
 * i.e. Resize(size / fraction) + RandomCrop(size)), `'randomResized'` ("crop, rand size":
 * torchvision's RandomResizedCrop with `scale` and `ratio`). Each is resized (bicubic) to
 * the model's size.
 */
export type CropMode = 'center' | 'fixed' | 'randomResized';

const CROP_MODES: readonly CropMode[] = ['center', 'fixed', 'randomResized'];

/** The published evaluation's Resize(256) + CenterCrop(224), as a fraction of the shorter side. */
export const PUBLISHED_CROP_FRACTION = 224 / 256;

/** Augmentation and normalisation; defaults are the published pre-training ones. */
export interface AugmentOptions {
  /** Which crop training uses (see {@link CropMode}). Default 'randomResized'. */
  crop?: CropMode;
  /** Older spelling of `crop`: true is 'randomResized', false 'center'. Give one of the two. */
  randomResizedCrop?: boolean;
  /**
   * Side of the 'fixed' crop and of every central crop (crop 'center', evaluation,
   * reconstruction) as a fraction of the image's shorter side, in (0, 1]. Default 1 (a
   * plain resize of the central square), except 224/256 with crop 'fixed'; the published
   * evaluation uses 224/256 ({@link PUBLISHED_CROP_FRACTION}).
   */
  cropFraction?: number;
  /** RandomResizedCrop's area range as fractions of the image. Default [0.2, 1]. */
  scale?: [number, number];
  /** RandomResizedCrop's aspect-ratio range. Default [3/4, 4/3]. */
  ratio?: [number, number];
  /** Random horizontal flips. Default true. */
  hflip?: boolean;
  /**
   * torchvision's ColorJitter(brightness, contrast, saturation) after the flip: one
   * strength for all three, or `[b, c, s]`; the paper's "crop + color jit" is 0.4. Works
   * on float pixels (torchvision's tensor path); saturation leaves 1-channel images alone.
   * Default 0 (off).
   */
  colorJitter?: number | [number, number, number];
  /**
   * timm's RandAugment, e.g. 'rand-m9-mstd0.5-inc1' (the published fine-tuning's): sections
   * m (magnitude), n (ops), mstd, mmax, p (op probability), inc (0|1). On 8-bit pixels after
   * the flip and jitter; geometric ops fill with the normalisation mean. Default off.
   */
  randAugment?: string;
  /** timm's RandomErasing probability (pixel mode, one box), after normalisation; the published fine-tuning's is 0.25. Default 0. */
  randomErasing?: number;
  /** Per-channel mean for normalisation. Default ImageNet's for 3 channels, Fashion-MNIST's for 1. */
  mean?: number[];
  /** Per-channel standard deviation. Default as `mean`. */
  std?: number[];
  /** Zero-pad images (centred) to this side before cropping, e.g. 28 -> 32. */
  padTo?: number;
}

/** Batching. */
export interface LoaderOptions {
  /** Images per step. Default 64. */
  batchSize?: number;
  /** Threads that decode and augment. Default 2. */
  workers?: number;
  /** Batches prepared ahead. Default 4. */
  prefetch?: number;
  /** Skip unreadable images with a warning (true) or fail (false). Default true. */
  skipCorrupt?: boolean;
}

/** ImageNet normalisation, the published default for RGB. */
export const IMAGENET_MEAN = [0.485, 0.456, 0.406];
/** ImageNet normalisation, the published default for RGB. */
export const IMAGENET_STD = [0.229, 0.224, 0.225];
/** Fashion-MNIST's pixel statistics, the default for one channel. */
export const FASHION_MNIST_MEAN = [0.286];
/** Fashion-MNIST's pixel statistics, the default for one channel. */
export const FASHION_MNIST_STD = [0.353];

export function datasetSpec(source: DatasetSource): Binding.NativeDatasetSpec {
  if (typeof source !== 'object' || source === null) throw new VitMaeError('E_ARGUMENT', 'data must be a DatasetSource object');
  switch (source.kind) {
    case 'folder':
    case 'idx':
      if (typeof source.path !== 'string' || !source.path) throw new VitMaeError('E_ARGUMENT', `a '${source.kind}' dataset needs a path`);
      return { kind: source.kind, path: source.path, labelsPath: source.kind === 'idx' ? source.labelsPath : undefined };
    case 'memory': {
      checkTensor(source.images, 'images', 'E_SHAPE');
      const labels = source.labels === undefined ? undefined : Array.from(source.labels);
      return { kind: 'memory', data: source.images.data, shape: source.images.shape, labels };
    }
    default:
      throw new VitMaeError('E_ARGUMENT', `unknown dataset kind '${(source as { kind: unknown }).kind}': expected folder, idx or memory`);
  }
}

export function normalisation(channels: number, augment: AugmentOptions): { mean: number[]; std: number[] } {
  const mean = augment.mean ?? (channels === 1 ? FASHION_MNIST_MEAN : IMAGENET_MEAN);
  const std = augment.std ?? (channels === 1 ? FASHION_MNIST_STD : IMAGENET_STD);
  if (mean.length !== channels || std.length !== channels) {
    throw new VitMaeError('E_ARGUMENT', `mean and std need ${channels} value(s), one per channel`);
  }
  return { mean, std };
}

function positiveInt(value: unknown, name: string, fallback: number): number {
  return value === undefined ? fallback : checkInteger(value, name, 1);
}

/** The crop `augment` asks for, `fallback` when it names none. */
export function cropMode(augment: AugmentOptions, fallback: CropMode = 'randomResized'): CropMode {
  const { crop, randomResizedCrop } = augment;
  if (crop !== undefined && !CROP_MODES.includes(crop)) {
    throw new VitMaeError('E_ARGUMENT', `unknown crop '${String(crop)}': expected ${CROP_MODES.join(', ')}`);
  }
  if (randomResizedCrop === undefined) return crop ?? fallback;
  const implied = randomResizedCrop ? 'randomResized' : 'center';
  if (crop !== undefined && crop !== implied) {
    throw new VitMaeError('E_ARGUMENT', `crop '${crop}' contradicts randomResizedCrop: ${randomResizedCrop}; give crop alone`);
  }
  return implied;
}

/** `value` if it is a number (the native side checks its range), else `E_ARGUMENT`. */
function checkNumber(value: unknown, name: string): number {
  if (typeof value !== 'number') throw new VitMaeError('E_ARGUMENT', `${name} must be a number, got ${typeof value}`);
  return value;
}

/** The central-crop fraction of evaluation passes for a model trained with `augment`. */
export function cropFraction(augment: AugmentOptions): number {
  if (augment.cropFraction !== undefined) return checkNumber(augment.cropFraction, 'cropFraction');
  return cropMode(augment) === 'fixed' ? PUBLISHED_CROP_FRACTION : 1;
}

function jitterStrengths(jitter: AugmentOptions['colorJitter'] = 0): number[] {
  const strengths = typeof jitter === 'number' ? [jitter, jitter, jitter] : jitter;
  if (!Array.isArray(strengths) || strengths.length !== 3 || strengths.some((s) => typeof s !== 'number' || !Number.isFinite(s) || s < 0)) {
    throw new VitMaeError('E_ARGUMENT', 'colorJitter must be a non-negative number or [brightness, contrast, saturation]');
  }
  return strengths;
}

export function loaderSpec(channels: number, seed: number, loader: LoaderOptions, augment: AugmentOptions, shuffle: boolean): Binding.NativeLoaderOptions {
  if (augment.randAugment !== undefined && typeof augment.randAugment !== 'string') {
    throw new VitMaeError('E_ARGUMENT', "randAugment must be a string such as 'rand-m9-mstd0.5-inc1'");
  }
  return {
    batchSize: positiveInt(loader.batchSize, 'batchSize', 64),
    seed,
    shuffle,
    workers: positiveInt(loader.workers, 'workers', 2),
    prefetch: positiveInt(loader.prefetch, 'prefetch', 4),
    skipCorrupt: loader.skipCorrupt ?? true,
    crop: cropMode(augment),
    cropFraction: cropFraction(augment),
    scale: augment.scale ?? [0.2, 1],
    ratio: augment.ratio ?? [3 / 4, 4 / 3],
    hflip: augment.hflip ?? true,
    colorJitter: jitterStrengths(augment.colorJitter),
    randAugment: augment.randAugment,
    randomErasing: augment.randomErasing === undefined ? 0 : checkNumber(augment.randomErasing, 'randomErasing'),
    padTo: augment.padTo === undefined ? undefined : checkInteger(augment.padTo, 'padTo', 1),
    ...normalisation(channels, augment),
  };
}

/** Loader options for one ordered pass over a dataset (evaluation, embedding): no shuffling, no augmentation (the central crop), every image. */
export function passSpec(channels: number, loader: LoaderOptions, augment: PassAugment = {}): Binding.NativeLoaderOptions {
  const { padTo, mean, std, cropFraction } = augment;
  return { ...loaderSpec(channels, 0, loader, { padTo, mean, std, cropFraction, crop: 'center', hflip: false }, false), dropLast: false, skipCorrupt: loader.skipCorrupt ?? false };
}

/** What an ordered pass takes of the augmentation: padding, the central crop, normalisation. */
export type PassAugment = Pick<AugmentOptions, 'padTo' | 'mean' | 'std' | 'cropFraction'>;
