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

/** Augmentation and normalisation; defaults are the published pre-training ones. */
export interface AugmentOptions {
  /** RandomResizedCrop to the model's size (true), or a plain resize (false). Default true. */
  randomResizedCrop?: boolean;
  /** Crop area range as fractions of the image. Default [0.2, 1]. */
  scale?: [number, number];
  /** Crop aspect-ratio range. Default [3/4, 4/3]. */
  ratio?: [number, number];
  /** Random horizontal flips. Default true. */
  hflip?: boolean;
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

export function loaderSpec(channels: number, seed: number, loader: LoaderOptions, augment: AugmentOptions, shuffle: boolean): Binding.NativeLoaderOptions {
  return {
    batchSize: positiveInt(loader.batchSize, 'batchSize', 64),
    seed,
    shuffle,
    workers: positiveInt(loader.workers, 'workers', 2),
    prefetch: positiveInt(loader.prefetch, 'prefetch', 4),
    skipCorrupt: loader.skipCorrupt ?? true,
    randomResizedCrop: augment.randomResizedCrop ?? true,
    scale: augment.scale ?? [0.2, 1],
    ratio: augment.ratio ?? [3 / 4, 4 / 3],
    hflip: augment.hflip ?? true,
    padTo: augment.padTo === undefined ? undefined : checkInteger(augment.padTo, 'padTo', 1),
    ...normalisation(channels, augment),
  };
}

/** Loader options for one ordered pass over a dataset (evaluation, embedding): no shuffling, no augmentation, every image. */
export function passSpec(channels: number, loader: LoaderOptions, augment: AugmentOptions = {}): Binding.NativeLoaderOptions {
  return { ...loaderSpec(channels, 0, loader, { ...augment, randomResizedCrop: false, hflip: false }, false), dropLast: false, skipCorrupt: loader.skipCorrupt ?? false };
}
