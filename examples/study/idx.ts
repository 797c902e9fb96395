// Reads IDX files (MNIST / Fashion-MNIST, gzip or plain) into typed arrays.
import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';

function read(path: string): Buffer {
  const raw = readFileSync(path);
  return raw[0] === 0x1f && raw[1] === 0x8b ? gunzipSync(raw) : raw;
}

/** Images as bytes [N, rows, cols]. */
export function readIdxImages(path: string): { data: Uint8Array; count: number; rows: number; cols: number } {
  const b = read(path);
  if (b.readUInt32BE(0) !== 0x00000803) throw new Error(`${path}: not an IDX image file`);
  const count = b.readUInt32BE(4), rows = b.readUInt32BE(8), cols = b.readUInt32BE(12);
  return { data: new Uint8Array(b.buffer, b.byteOffset + 16, count * rows * cols), count, rows, cols };
}

export function readIdxLabels(path: string): Uint8Array {
  const b = read(path);
  if (b.readUInt32BE(0) !== 0x00000801) throw new Error(`${path}: not an IDX label file`);
  return new Uint8Array(b.buffer, b.byteOffset + 8, b.readUInt32BE(4));
}
