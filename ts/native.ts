// Loads the N-API addon and turns its errors into VitMaeError.
//
// The CPU addon is found by the generated loader, native/node/binding.cjs: next to it in a
// clone (`npm run build:native` builds it there), otherwise in the platform package npm
// installed as an optional dependency (vit-mae-linux-x64-gnu). A CUDA-linked addon, when
// there is one, is tried first: VIT_MAE_CUDA_ADDON, else native/node/vit-mae.cuda.node in a
// clone (`npm run build:native:cuda`), else the optional package vit-mae-linux-x64-gnu-cuda
// when the user installed it (of the same version as vit-mae). It links libcuda.so.1,
// cuBLAS, cuRAND and NVRTC dynamically, so on a machine without the NVIDIA driver (or
// without those libraries) it fails to load, and the CPU addon is used instead. Both
// export the same API (binding.d.cts).
//
//   VIT_MAE_CPU_ONLY=1         never try a CUDA addon
//   VIT_MAE_CUDA_ADDON=<path>  try this file instead of the clone's or the package's
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type * as Binding from '../native/node/binding.cjs';
import { ERROR_CODES, VitMaeError, type ErrorCode } from './errors.js';

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
const CLONE_CUDA_ADDON = fileURLToPath(new URL('../native/node/vit-mae.cuda.node', import.meta.url));
const CUDA_PACKAGE = 'vit-mae-linux-x64-gnu-cuda';

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

/**
 * candle captures a backtrace into each of its errors when `RUST_BACKTRACE` is set, and
 * the error's text then carries it into messages (which are one statement each), at
 * the cost of a stack walk per error. `RUST_LIB_BACKTRACE=0` turns that capture off and
 * leaves panics' backtraces (printed to stderr) to `RUST_BACKTRACE`. Set before the
 * addon loads, as Rust reads it once; a user's own setting wins.
 */
function configureBacktraces(): void {
  process.env.RUST_LIB_BACKTRACE ??= '0';
}

/**
 * The CUDA addon to try, if any: the one VIT_MAE_CUDA_ADDON names, a clone's build, or the
 * installed CUDA package. `reason` says why a named or installed one cannot be tried.
 */
function findCudaAddon(require: NodeJS.Require): { path?: string; reason?: string } {
  const named = process.env.VIT_MAE_CUDA_ADDON || undefined;
  if (named) return existsSync(named) ? { path: named } : { reason: `VIT_MAE_CUDA_ADDON names ${named}, which does not exist` };
  if (existsSync(CLONE_CUDA_ADDON)) return { path: CLONE_CUDA_ADDON };
  if (process.platform !== 'linux' || process.arch !== 'x64') return {};
  let manifestPath: string;
  try {
    manifestPath = require.resolve(`${CUDA_PACKAGE}/package.json`);
  } catch {
    return {}; // not installed: the usual case
  }
  const cuda = JSON.parse(readFileSync(manifestPath, 'utf8')) as { version: string; main: string };
  const own = (require('../package.json') as { version: string }).version;
  if (cuda.version !== own) {
    return { reason: `${CUDA_PACKAGE} ${cuda.version} is installed, but vit-mae is ${own} (install ${CUDA_PACKAGE}@${own})` };
  }
  return { path: join(dirname(manifestPath), cuda.main) };
}

function loadBinding(): { binding: typeof Binding; backend: NativeBackend } {
  configureCandleThreads();
  configureBacktraces();
  const require = createRequire(import.meta.url);
  let fallbackReason: string | undefined;
  if (!envFlag('VIT_MAE_CPU_ONLY')) {
    const { path, reason } = findCudaAddon(require);
    if (path) {
      try {
        return { binding: loadCuda(path), backend: { cuda: true, path } };
      } catch (cause) {
        fallbackReason = `the CUDA addon ${path} could not be loaded (${(cause as Error).message}); using the CPU addon`;
      }
    } else if (reason) {
      fallbackReason = `${reason}; using the CPU addon`;
    }
  }
  const path = require.resolve(CPU_BINDING);
  try {
    return { binding: require(path) as typeof Binding, backend: { cuda: false, path, fallbackReason } };
  } catch (cause) {
    const cuda = fallbackReason ? ` (and ${fallbackReason.replace(/; using the CPU addon$/, '')})` : '';
    throw new VitMaeError(
      'E_NATIVE_LOAD',
      `the vit-mae native addon could not be loaded: an installed vit-mae loads it from its platform package (vit-mae-linux-x64-gnu, an optional dependency npm installs on linux-x64 with glibc unless optional dependencies are omitted); a clone builds it with \`npm install\`. ${(cause as Error).message}${cuda}`,
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

const KNOWN_CODES: ReadonlySet<string> = new Set(ERROR_CODES);

/**
 * Rethrows a native error as a VitMaeError: the addon's errors carry their code in
 * `code` and a plain message. Any other error (one napi-rs raised converting an
 * argument, or an unknown code) is a bug: `E_INTERNAL`, the original kept as `cause`.
 */
export function rethrow(error: unknown): never {
  if (error instanceof VitMaeError) throw error;
  const message = error instanceof Error ? error.message : String(error);
  const code = (error as { code?: unknown } | null)?.code;
  if (error instanceof Error && typeof code === 'string' && KNOWN_CODES.has(code)) {
    throw new VitMaeError(code as ErrorCode, message, { cause: error });
  }
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
