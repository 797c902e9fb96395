// Loads the N-API addon and turns its errors into VitMaeError.
//
// Two addons can sit in native/node: the CPU one the generated binding.cjs loads (built by
// `npm run build:native`), and optionally a CUDA-linked one, vit-mae.cuda.node (built by
// `npm run build:native:cuda`). The CUDA one is tried first; it links libcuda.so.1, cuBLAS,
// cuRAND and NVRTC dynamically, so on a machine without the NVIDIA driver (or without those
// libraries) it fails to load, and the CPU addon is used instead. Both export the same API
// (binding.d.cts).
//
//   VIT_MAE_CPU_ONLY=1         never try the CUDA addon
//   VIT_MAE_CUDA_ADDON=<path>  try this file instead of native/node/vit-mae.cuda.node
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import type * as Binding from '../native/node/binding.cjs';
import { VitMaeError } from './errors.js';

export type { Binding };

/** Which native addon this process loaded, from {@link nativeBackend}. */
export interface NativeBackend {
  /**
   * Whether the CUDA-built addon loaded. It means CUDA devices can be asked for, not that a
   * GPU is present: that is decided when a model is put on a device (`'auto'` falls back to
   * the CPU).
   */
  cuda: boolean;
  /** The file loaded: the CUDA addon, or the CPU binding's loader (binding.cjs). */
  path: string;
  /** Why the CUDA addon is not in use although one was found (or named): its load error. */
  fallbackReason?: string;
}

const CPU_BINDING = '../native/node/binding.cjs';
const CUDA_ADDON = fileURLToPath(new URL('../native/node/vit-mae.cuda.node', import.meta.url));

function envFlag(name: string): boolean {
  const value = process.env[name];
  return value !== undefined && value !== '' && value !== '0';
}

function loadCuda(path: string): typeof Binding {
  // process.dlopen rather than require: it loads the file as an addon whatever its name.
  const module = { exports: {} as typeof Binding };
  process.dlopen(module, path);
  return module.exports;
}

/**
 * candle runs large elementwise ops on a thread pool of its own whose threads spin
 * between ops, beside rayon's (which our kernels use): on few cores they steal each
 * other's time. One candle thread measured 19% faster training on `tiny` and no slower on
 * `base` (2 cores). Set before the addon loads, as candle reads it once; a user's own
 * setting wins.
 */
function configureCandleThreads(): void {
  process.env.CANDLE_NUM_THREADS ??= '1';
}

function loadBinding(): { binding: typeof Binding; backend: NativeBackend } {
  configureCandleThreads();
  let fallbackReason: string | undefined;
  if (!envFlag('VIT_MAE_CPU_ONLY')) {
    const named = process.env.VIT_MAE_CUDA_ADDON || undefined;
    const path = named ?? CUDA_ADDON;
    if (existsSync(path)) {
      try {
        return { binding: loadCuda(path), backend: { cuda: true, path } };
      } catch (cause) {
        fallbackReason = `the CUDA addon ${path} could not be loaded (${(cause as Error).message}); using the CPU addon`;
      }
    } else if (named) {
      fallbackReason = `VIT_MAE_CUDA_ADDON names ${path}, which does not exist; using the CPU addon`;
    }
  }
  const require = createRequire(import.meta.url);
  const path = require.resolve(CPU_BINDING);
  try {
    return { binding: require(path) as typeof Binding, backend: { cuda: false, path, fallbackReason } };
  } catch (cause) {
    const cuda = fallbackReason ? ` (and ${fallbackReason.replace(/; using the CPU addon$/, '')})` : '';
    throw new VitMaeError(
      'E_NATIVE_LOAD',
      `the vit-mae native addon could not be loaded (run \`npm install\` to build it): ${(cause as Error).message}${cuda}`,
      { cause },
    );
  }
}

const loaded = loadBinding();

export const binding = loaded.binding;

/** Which native addon is in use (CUDA-built or CPU), and why the CUDA one is not if it failed to load. */
export function nativeBackend(): NativeBackend {
  return { ...loaded.backend };
}

/** The native model behind each MaskedAutoencoder, for building classifiers on it. */
export const maeNatives = new WeakMap<object, Binding.NativeMae>();

const CODED = /^(E_[A-Z_]+): ([\s\S]*)$/;

/** Rethrows a native error as a VitMaeError with its code. */
export function rethrow(error: unknown): never {
  if (error instanceof VitMaeError) throw error;
  const message = error instanceof Error ? error.message : String(error);
  const match = CODED.exec(message);
  if (match) throw new VitMaeError(match[1] as VitMaeError['code'], match[2], { cause: error });
  throw new VitMaeError('E_INTERNAL', message, { cause: error });
}

/** Calls into the binding, mapping errors (sync and async) to VitMaeError. */
export async function call<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (error) {
    rethrow(error);
  }
}

export function callSync<T>(fn: () => T): T {
  try {
    return fn();
  } catch (error) {
    rethrow(error);
  }
}
