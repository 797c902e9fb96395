// Test helpers: the reference fixtures and a minimal safetensors reader/writer.
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import zlib from 'node:zlib';
import { expect } from 'vitest';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { MaeConfig, Tensor } from '../ts/index.js';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');

/** The repository's own PyTorch reference fixtures (written by test/fixtures/generate.py). */
export const FIXTURES = resolve(root, 'test/fixtures');

/**
 * Every fixture folder the parity tests hold the model to: the repository's own, then
 * VIT_MAE_FIXTURES when set, else `../shared/fixtures` beside the repository when it
 * exists (fixtures of an independent implementation).
 */
export const FIXTURE_DIRS: string[] = [FIXTURES, ...(process.env.VIT_MAE_FIXTURES ? [process.env.VIT_MAE_FIXTURES] : existsSync(resolve(root, '../shared/fixtures')) ? [resolve(root, '../shared/fixtures')] : [])];

export function fixture(name: string, dir = FIXTURES): string {
  return join(dir, name);
}

export interface SafetensorsFile {
  tensors: Record<string, Tensor>;
  /** Integer tensors, as numbers. */
  ints: Record<string, { data: number[]; shape: number[] }>;
  metadata: Record<string, string>;
}

export function readSafetensors(path: string): SafetensorsFile {
  const bytes = readFileSync(path);
  const headerLength = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString('utf8')) as Record<string, any>;
  const body = bytes.subarray(8 + headerLength);
  const out: SafetensorsFile = { tensors: {}, ints: {}, metadata: header.__metadata__ ?? {} };
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const [start, end] = info.data_offsets as [number, number];
    const raw = body.subarray(start, end);
    const copy = raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength);
    if (info.dtype === 'F32') out.tensors[name] = { data: new Float32Array(copy), shape: info.shape };
    else if (info.dtype === 'I64') out.ints[name] = { data: Array.from(new BigInt64Array(copy), Number), shape: info.shape };
    else throw new Error(`unsupported dtype ${info.dtype} in test helper`);
  }
  return out;
}

/** Writes F32 tensors, and F64 ones for those given as a Float64Array. */
export function writeSafetensors(tensors: Record<string, Tensor | { data: Float64Array; shape: number[] }>, metadata?: Record<string, string>): Buffer {
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    const dtype = t.data instanceof Float64Array ? 'F64' : 'F32';
    header[name] = { dtype, shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const head = Buffer.alloc(8);
  head.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  const parts = Object.values(tensors).map((t) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength));
  return Buffer.concat([head, Buffer.from(json), ...parts]);
}

/** A tiny RGB MAE: 16x16 images, 4x4 patches, 2 blocks of width 16. */
export const TINY: MaeConfig = {
  imgSize: 16,
  patchSize: 4,
  inChans: 3,
  embedDim: 16,
  depth: 2,
  numHeads: 2,
  decoderEmbedDim: 8,
  decoderDepth: 1,
  decoderNumHeads: 2,
  mlpRatio: 4,
  normPixLoss: false,
  layerNormEps: 1e-6,
};

/** Deterministic pseudo-random values (mulberry32) for test inputs. */
export function randomTensor(shape: number[], seed = 1): Tensor {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const size = shape.reduce((x, y) => x * y, 1);
  return { data: Float32Array.from({ length: size }, () => next() * 2 - 1), shape };
}

/** Largest elementwise |a - b| relative to max(tol, tol * |b|) ... returns the worst offender. */
export function worstMismatch(got: Float32Array, want: Float32Array, tolerance: (want: number) => number): string | null {
  if (got.length !== want.length) return `length ${got.length} != ${want.length}`;
  for (let i = 0; i < got.length; i++) {
    if (!(Math.abs(got[i] - want[i]) <= tolerance(want[i]))) return `[${i}] got ${got[i]}, want ${want[i]}`;
  }
  return null;
}

/** A minimal 8-bit grayscale PNG, for image-folder tests. */
export function encodePng(width: number, height: number, pixel: (x: number, y: number) => number): Buffer {
  const data = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) data[y * width + x] = pixel(x, y);
  return encodePngPixels(width, height, 1, data);
}

/** A minimal 8-bit PNG of interleaved pixels: gray (1 channel), RGB (3) or RGBA (4). */
export function encodePngPixels(width: number, height: number, channels: 1 | 3 | 4, data: Uint8Array): Buffer {
  const chunk = (type: string, body: Buffer) => {
    const length = Buffer.alloc(4);
    length.writeUInt32BE(body.length);
    const typed = Buffer.concat([Buffer.from(type, 'ascii'), body]);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(zlib.crc32(typed));
    return Buffer.concat([length, typed, crc]);
  };
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header.writeUInt8(8, 8); // bit depth
  header.writeUInt8({ 1: 0, 3: 2, 4: 6 }[channels], 9); // colour type: gray, RGB, RGBA
  const stride = width * channels;
  const rows = Buffer.alloc((stride + 1) * height); // each row: filter 0 (none), then its bytes
  for (let y = 0; y < height; y++) rows.set(data.subarray(y * stride, (y + 1) * stride), y * (stride + 1) + 1);
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', header),
    chunk('IDAT', zlib.deflateSync(rows)),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

/**
 * The `mae-tiny` fixture as Transformers saves a `ViTMAEModel` in `folder`: the encoder
 * alone, without `ViTMAEForPreTraining`'s `vit.` prefix.
 */
export function writeHuggingFaceEncoder(folder: string): void {
  const hf = readSafetensors(fixture('mae-tiny.hf/model.safetensors'));
  const encoder = Object.fromEntries(Object.entries(hf.tensors).flatMap(([k, t]) => (k.startsWith('vit.') ? [[k.slice('vit.'.length), t]] : [])));
  mkdirSync(folder, { recursive: true });
  writeFileSync(join(folder, 'model.safetensors'), writeSafetensors(encoder));
  const config = JSON.parse(readFileSync(fixture('mae-tiny.hf/config.json'), 'utf8'));
  writeFileSync(join(folder, 'config.json'), JSON.stringify({ ...config, architectures: ['ViTMAEModel'] }));
}

/** Width and height from a PNG's IHDR. */
export function pngSize(png: Buffer): { width: number; height: number } {
  expect(png.subarray(1, 4).toString('ascii')).toBe('PNG');
  return { width: png.readUInt32BE(16), height: png.readUInt32BE(20) };
}

/** A folder of labelled grayscale PNGs: `root/<class>/<i>.png`, `perClass` images per class, distinct per class. */
export function writeImageFolder(root: string, classes: string[], perClass: number, size = 20): void {
  classes.forEach((cls, c) => {
    mkdirSync(join(root, cls), { recursive: true });
    for (let i = 0; i < perClass; i++) {
      // Class 0 bright on the left, class 1 on the right, ...: learnable, and every image differs.
      const png = encodePng(size, size, (x, y) => (Math.floor((x * classes.length) / size) === c ? 200 : 40) + ((x * 3 + y * 5 + i * 7) % 40));
      writeFileSync(join(root, cls, `${String(i).padStart(3, '0')}.png`), png);
    }
  });
}

/** An IDX3 images file (`[n, rows, cols]` unsigned bytes, uncompressed). */
export function encodeIdxImages(n: number, rows: number, cols: number, pixel: (i: number, x: number, y: number) => number): Buffer {
  const head = Buffer.alloc(16);
  head.writeUInt32BE(0x00000803, 0);
  head.writeUInt32BE(n, 4);
  head.writeUInt32BE(rows, 8);
  head.writeUInt32BE(cols, 12);
  const body = Buffer.alloc(n * rows * cols);
  for (let i = 0; i < n; i++) for (let y = 0; y < rows; y++) for (let x = 0; x < cols; x++) body[(i * rows + y) * cols + x] = pixel(i, x, y);
  return Buffer.concat([head, body]);
}

/** An IDX1 labels file (unsigned bytes, uncompressed). */
export function encodeIdxLabels(labels: number[]): Buffer {
  const head = Buffer.alloc(8);
  head.writeUInt32BE(0x00000801, 0);
  head.writeUInt32BE(labels.length, 4);
  return Buffer.concat([head, Buffer.from(labels)]);
}

/** A zip archive of `members` (name, data, method 0 = stored or 8 = deflated), as the format lays it out, with each member's CRC-32. */
export function zip(members: [string, Buffer, number][]): Buffer {
  const locals: Buffer[] = [];
  const centrals: Buffer[] = [];
  let offset = 0;
  for (const [name, data, method] of members) {
    const packed = method === 8 ? zlib.deflateRawSync(data) : data;
    const crc = zlib.crc32(data);
    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(method, 8);
    local.writeUInt32LE(crc, 14);
    local.writeUInt32LE(packed.length, 18);
    local.writeUInt32LE(data.length, 22);
    local.writeUInt16LE(name.length, 26);
    const central = Buffer.alloc(46);
    central.writeUInt32LE(0x02014b50, 0);
    central.writeUInt16LE(method, 10);
    central.writeUInt32LE(crc, 16);
    central.writeUInt32LE(packed.length, 20);
    central.writeUInt32LE(data.length, 24);
    central.writeUInt16LE(name.length, 28);
    central.writeUInt32LE(offset, 42);
    locals.push(local, Buffer.from(name), packed);
    centrals.push(central, Buffer.from(name));
    offset += 30 + name.length + packed.length;
  }
  const directory = Buffer.concat(centrals);
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0);
  end.writeUInt16LE(members.length, 8);
  end.writeUInt16LE(members.length, 10);
  end.writeUInt32LE(directory.length, 12);
  end.writeUInt32LE(offset, 16);
  return Buffer.concat([...locals, directory, end]);
}
