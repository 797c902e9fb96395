import { VitMaeError, type ErrorCode } from './errors.js';

/** A dense float32 tensor in row-major order. */
export interface Tensor {
  /** The values, row-major; `data.length` is the product of `shape`. */
  data: Float32Array;
  /** The size of each dimension, outermost first. */
  shape: number[];
}

/** Checks that `value` is a well-formed Tensor, or throws with `code` naming `what`. */
export function checkTensor(value: unknown, what: string, code: ErrorCode): asserts value is Tensor {
  const t = value as Partial<Tensor> | null;
  if (typeof t !== 'object' || t === null || !(t.data instanceof Float32Array) || !Array.isArray(t.shape)) {
    throw new VitMaeError(code, `${what} must be a tensor { data: Float32Array, shape: number[] }`);
  }
  if (!t.shape.every((d) => Number.isInteger(d) && d >= 0 && d <= 0xffffffff)) {
    throw new VitMaeError(code, `${what} has an invalid shape ${JSON.stringify(t.shape)}: dimensions must be non-negative integers`);
  }
  const size = t.shape.reduce((a, b) => a * b, 1);
  if (size !== t.data.length) {
    throw new VitMaeError(code, `${what} has ${t.data.length} values but shape [${t.shape.join(', ')}] needs ${size}`);
  }
}
