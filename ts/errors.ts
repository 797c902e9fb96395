/**
 * What went wrong, as a stable machine-readable code:
 *
 * - `E_SHAPE`: an input tensor has the wrong rank, shape or length for the model.
 * - `E_INPUT`: an input tensor holds a value the model cannot use, NaN or ±Infinity (the message gives the first one's index, flat and as `[n, c, y, x]`).
 * - `E_MASK_RATIO`: `maskRatio` is outside [0, 1), or does not suit the masking strategy.
 * - `E_NOISE`: masking noise has the wrong shape, is not finite, or was given for non-random masking.
 * - `E_CONFIG`: a model configuration is incomplete, unknown, inconsistent or out of range.
 * - `E_ARGUMENT`: another argument is invalid (seed, device, masking name, path, image size, count).
 * - `E_CHECKPOINT_NOT_FOUND`: no checkpoint at the path.
 * - `E_CHECKPOINT_CORRUPT`: the file is not a readable checkpoint (corrupt, truncated, another format).
 * - `E_CHECKPOINT_KEYS`: the checkpoint has unknown keys or lacks required ones (the message lists them).
 * - `E_CHECKPOINT_SHAPE`: a checkpoint tensor's shape contradicts the configuration.
 * - `E_IO`: reading or writing a file failed (for an image input: the file is missing or unreadable; the message names it and its index).
 * - `E_IMAGE`: an image input is unusable: bytes that are no image (PNG, JPEG, GIF, BMP, WebP, TIFF), a zero side, an unsupported channel count, or raw pixels that do not fill `width x height x channels`; the message names the item by its index (and path).
 * - `E_NON_FINITE_LOSS`: a training step's loss, gradient or update was NaN or infinite, and the run stopped before that update (the message names the last good checkpoint).
 * - `E_ABORTED`: an evaluation or embedding was cancelled by its AbortSignal, or a training run was started with a signal already aborted.
 * - `E_BUSY`: the model is training; every other call on it is refused until the run ends. Also: a second job of several ranks while one runs in this process (their collectives would interleave).
 * - `E_DISPOSED`: the model was disposed (`dispose()`); its weights are freed.
 * - `E_OUT_OF_MEMORY`: a valid model (or batch of images) needs more memory than the process can allocate; the message says how much. Checked before anything is allocated.
 * - `E_DISTRIBUTED`: distributed training failed: no MPI library could be loaded (the message names the libraries tried and the packages that provide one), the launcher and the library disagree, an MPI call failed, or a collective did not complete within the timeout because another process died, failed or fell behind (the message names the operation, the rank and the timeout). The process group is unusable afterwards.
 * - `E_NATIVE_LOAD`: the native addon could not be loaded.
 * - `E_INTERNAL`: a bug in vit-mae; please report it.
 */
export type ErrorCode = (typeof ERROR_CODES)[number];

/** Every {@link ErrorCode}: the codes a `VitMaeError` can have (the facade checks the addon's against them). */
export const ERROR_CODES = [
  'E_SHAPE',
  'E_INPUT',
  'E_MASK_RATIO',
  'E_NOISE',
  'E_CONFIG',
  'E_ARGUMENT',
  'E_CHECKPOINT_NOT_FOUND',
  'E_CHECKPOINT_CORRUPT',
  'E_CHECKPOINT_KEYS',
  'E_CHECKPOINT_SHAPE',
  'E_IO',
  'E_IMAGE',
  'E_NON_FINITE_LOSS',
  'E_ABORTED',
  'E_BUSY',
  'E_DISPOSED',
  'E_OUT_OF_MEMORY',
  'E_DISTRIBUTED',
  'E_NATIVE_LOAD',
  'E_INTERNAL',
] as const;

/** The error every vit-mae call throws or rejects with. */
export class VitMaeError extends Error {
  /** Which kind of problem this is; stable across versions. */
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'VitMaeError';
    this.code = code;
  }
}
