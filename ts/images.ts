// Images as applications hold them: file paths, encoded bytes, raw pixels, made into
// model inputs by the native dataset pipeline's own decoding and evaluation transform.
import { checkInteger } from './common.js';
import { loaderSpec, PUBLISHED_CROP_FRACTION } from './data.js';
import { VitMaeError } from './errors.js';
import { binding, call, type Binding } from './native.js';
import { checkTensor, type Tensor } from './tensor.js';

/**
 * Raw interleaved 8-bit pixels, row-major, as a canvas `ImageData` (RGBA) or `sharp`'s
 * `.raw()` output (`{ data, ...info }`) hold them. Alpha is dropped, as it is when an RGBA
 * file is decoded.
 */
export interface RawPixels {
  /** `width * height * channels` bytes. */
  data: Uint8Array | Uint8ClampedArray;
  /** Columns. */
  width: number;
  /** Rows. */
  height: number;
  /** 1 (gray), 3 (RGB) or 4 (RGBA). Default: what `data.length` implies (so an `ImageData` needs none). */
  channels?: 1 | 3 | 4;
}

/**
 * One image as an application holds it: the path of a file, a file's bytes (a `Buffer`
 * or `Uint8Array` of PNG, JPEG, GIF, BMP, WebP or TIFF, from an upload or a fetch), or
 * {@link RawPixels}.
 */
export type ImageInput = string | Uint8Array | RawPixels;

/** A batch of images: one, or an array (kinds may be mixed). */
export type Images = ImageInput | readonly ImageInput[];

/** How images are made into model inputs: the evaluation transform of the dataset passes. */
export interface TransformOptions {
  /**
   * `'cover'` (default): resize and center-crop as the published evaluation does: the
   * central square of {@link cropFraction} of the shorter side, resized (bicubic) to the
   * model's size. `'fill'`: a plain resize of the whole image to the model's square,
   * aspect ratio not kept (torchvision's `Resize((size, size))`).
   */
  fit?: 'cover' | 'fill';
  /**
   * With `fit: 'cover'`, the side of the central square as a fraction of the shorter side,
   * in (0, 1]. Default 224/256 ({@link PUBLISHED_CROP_FRACTION}, the published
   * `Resize(256)` + `CenterCrop(224)`); 1 is what `evaluate` and `embedDataset` use by
   * default (the whole central square).
   */
  cropFraction?: number;
  /** Zero-pad images (centred) to this side first, as in training (e.g. Fashion-MNIST's 28 -> 32). */
  padTo?: number;
  /** Per-channel mean. Default ImageNet's for 3 channels, Fashion-MNIST's for 1. */
  mean?: number[];
  /** Per-channel standard deviation. Default as `mean`. */
  std?: number[];
}

/** Options of {@link preprocess}: the model's input size and the transform. */
export interface PreprocessOptions extends TransformOptions {
  /** Side of the square model input. */
  imgSize: number;
  /** Channels of the model input: 1 (RGB becomes gray by ITU-R 601-2 luma) or 3 (gray is replicated). */
  inChans: number;
}

const FITS = ['cover', 'fill'];

/** Whether `value` is a {@link Tensor} rather than images. */
export function isTensor(value: unknown): value is Tensor {
  // Anything with a shape is meant as a tensor, so that a malformed one gets E_SHAPE.
  return typeof value === 'object' && value !== null && !(value instanceof Uint8Array) && !Array.isArray(value) && 'shape' in value;
}

/** `images` as a list (a lone image is a list of one); none at all is `E_ARGUMENT`. */
export function imageList(images: Images): readonly ImageInput[] {
  const list = Array.isArray(images) ? (images as readonly ImageInput[]) : [images as ImageInput];
  if (list.length === 0) throw new VitMaeError('E_ARGUMENT', 'no images given');
  return list;
}

function nativeInput(image: ImageInput, index: number): Binding.NativeImageInput {
  if (typeof image === 'string') {
    if (image === '') throw new VitMaeError('E_IMAGE', `image ${index}: the path is empty`);
    return { path: image };
  }
  if (image instanceof Uint8Array) return { bytes: image };
  if (typeof image === 'object' && image !== null && (image.data instanceof Uint8Array || image.data instanceof Uint8ClampedArray)) {
    const { data, width, height } = image;
    for (const [name, value] of Object.entries({ width, height })) {
      if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) throw new VitMaeError('E_IMAGE', `image ${index}: ${name} must be a non-negative integer, got ${String(value)}`);
    }
    const pixels = width * height;
    let channels: number | undefined = image.channels;
    if (channels === undefined) {
      if (pixels > 0 && data.length % pixels !== 0) throw new VitMaeError('E_IMAGE', `image ${index}: ${data.length} bytes are not a whole number of channels of ${width}x${height} pixels`);
      channels = pixels > 0 ? data.length / pixels : 1; // an empty side is named by the native check
    }
    if (!Number.isInteger(channels) || channels < 0 || channels > 0xffffffff) throw new VitMaeError('E_IMAGE', `image ${index}: channels must be 1, 3 or 4, got ${String(channels)}`);
    // A view of the same memory: a Uint8ClampedArray's bytes are copied once, natively.
    const bytes = data instanceof Uint8Array ? data : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    return { bytes, width, height, channels };
  }
  throw new VitMaeError('E_IMAGE', `image ${index} is not a path, a Buffer/Uint8Array of an encoded image, or raw pixels { data, width, height, channels }`);
}

/** The binding's transform for `options`, checked. */
function transformSpec(inChans: number, options: TransformOptions): Binding.NativeLoaderOptions {
  if (typeof options !== 'object' || options === null) throw new VitMaeError('E_ARGUMENT', 'preprocessing options must be an object');
  const { fit = 'cover', cropFraction = PUBLISHED_CROP_FRACTION, padTo, mean, std } = options;
  if (!FITS.includes(fit)) throw new VitMaeError('E_ARGUMENT', `fit must be 'cover' or 'fill', got ${String(fit)}`);
  const spec = loaderSpec(inChans, 0, { batchSize: 1, workers: 1, prefetch: 1 }, { padTo, mean, std, cropFraction, crop: 'center', hflip: false }, false);
  return { ...spec, crop: fit === 'fill' ? 'whole' : 'center' };
}

/**
 * Images made into a model input `[N, inChans, imgSize, imgSize]`, normalised: decoded,
 * padded, cropped, resized and normalised natively, off the JS thread, by the code the
 * dataset loader runs, so that a file gives the tensor `loadImages` or `embedDataset`
 * gives it in evaluation mode (with the same `cropFraction`), bit for bit, whichever way
 * it arrives (path, bytes, raw pixels).
 *
 * An unusable image rejects with `E_IMAGE` (bytes that are no image, a zero side, an
 * unsupported channel count, pixels that do not fill their size) or `E_IO` (a missing or
 * unreadable file), the message naming the first such item by its index and path.
 *
 * ```ts
 * const batch = await preprocess(['cat.jpg', uploadBuffer, imageData], { imgSize: 224, inChans: 3 });
 * ```
 */
export async function preprocess(images: Images, options: PreprocessOptions): Promise<Tensor> {
  if (typeof options !== 'object' || options === null) throw new VitMaeError('E_ARGUMENT', 'preprocess needs options with imgSize and inChans');
  const imgSize = checkInteger(options.imgSize, 'imgSize', 1);
  const inChans = checkInteger(options.inChans, 'inChans', 1);
  return preprocessFor(images, imgSize, inChans, options);
}

/** {@link preprocess} for a model of `imgSize` and `inChans`. */
export async function preprocessFor(images: Images, imgSize: number, inChans: number, options: TransformOptions = {}): Promise<Tensor> {
  const spec = transformSpec(inChans, options);
  const inputs = imageList(images).map(nativeInput);
  const t = await call(() => binding.preprocessImages(inputs, spec, imgSize, inChans));
  return { data: t.data, shape: t.shape };
}

/** The model input for `images`: a tensor as given (checked, else `E_SHAPE`), anything else preprocessed for the model. */
export async function modelInput(images: Tensor | Images, imgSize: number, inChans: number, transform: TransformOptions | undefined): Promise<Tensor> {
  if (isTensor(images)) {
    if (transform !== undefined) throw new VitMaeError('E_ARGUMENT', 'transform applies to images, not to a tensor (already a model input)');
    checkTensor(images, 'images', 'E_SHAPE');
    return images;
  }
  return preprocessFor(images, imgSize, inChans, transform);
}

/** Images preprocessed at most this many at a time by {@link embedInChunks}: memory stays flat however many are given. */
export const EMBED_CHUNK = 64;

/**
 * `embed` over `images`: a tensor in one call; images preprocessed and embedded
 * {@link EMBED_CHUNK} at a time, the features `[N, D]` concatenated in order.
 */
export async function embedInChunks(images: Tensor | Images, imgSize: number, inChans: number, transform: TransformOptions | undefined, embed: (input: Tensor) => Promise<Tensor>): Promise<Tensor> {
  if (isTensor(images)) return embed(await modelInput(images, imgSize, inChans, transform));
  const list = imageList(images);
  const parts: Tensor[] = [];
  for (let start = 0; start < list.length; start += EMBED_CHUNK) {
    const chunk = list.slice(start, start + EMBED_CHUNK);
    try {
      parts.push(await embed(await preprocessFor(chunk, imgSize, inChans, transform)));
    } catch (e) {
      // Items are numbered within the chunk natively; the caller numbers them in the whole list.
      throw start === 0 || !(e instanceof VitMaeError) ? e : new VitMaeError(e.code, e.message.replace(/^image (\d+)/, (_, i: string) => `image ${start + Number(i)}`), { cause: e });
    }
  }
  if (parts.length === 1) return parts[0];
  const width = parts[0].shape[1];
  const data = new Float32Array(list.length * width);
  parts.forEach((p, i) => data.set(p.data, i * EMBED_CHUNK * width));
  return { data, shape: [list.length, width] };
}
