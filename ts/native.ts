// Loads the generated N-API binding and turns its errors into VitMaeError.
import { createRequire } from 'node:module';
import type * as Binding from '../native/node/binding.cjs';
import { VitMaeError } from './errors.js';

export type { Binding };

function loadBinding(): typeof Binding {
  const require = createRequire(import.meta.url);
  try {
    return require('../native/node/binding.cjs') as typeof Binding;
  } catch (cause) {
    throw new VitMaeError(
      'E_NATIVE_LOAD',
      `the vit-mae native addon could not be loaded (run \`npm install\` to build it): ${(cause as Error).message}`,
      { cause },
    );
  }
}

export const binding = loadBinding();

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
