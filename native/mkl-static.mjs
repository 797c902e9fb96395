#!/usr/bin/env node
// Fetches Intel oneMKL's static libraries for the build (native/core/build.rs links them
// beside OpenBLAS and picks MKL's sgemm at run time on Intel CPUs, as PyTorch does), from
// the pinned `mkl-static` wheel on PyPI, into <repository>/.mkl/lib (about 650 MB; the
// built addon grows by the ~35 MB of sgemm code it pulls in). Runs before every native
// build (`npm run build:native`); a second run with the same pin does nothing.
//
// It never fails the build: on any error (no network, another platform, VIT_MAE_NO_MKL=1)
// it prints a warning and the build uses OpenBLAS alone, which is today's speed on AMD
// and slower on Intel. MKL_STATIC_DIR, when set, names a folder that already holds
// libmkl_intel_lp64.a, libmkl_sequential.a and libmkl_core.a; nothing is fetched then.
//
// Licence: the Intel Simplified Software License, which allows redistributing the
// binaries unmodified with its terms; they are in licenses/intel-mkl.txt, shipped in the
// package.
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { inflateRawSync } from "node:zlib";

const WHEEL = {
  url: "https://files.pythonhosted.org/packages/38/9a/cba6e6f980cae556f9028a86dd19669c686451a0649bf931aa556974fcfb/mkl_static-2026.2.0-py2.py3-none-manylinux_2_28_x86_64.whl",
  sha256: "090e439bf202b45579c75d2ba50ff7ead05752d553a06aba79c3ed2b5247921b",
};
const DATA = "mkl_static-2026.2.0.data/data/lib/";
const LIBRARIES = ["libmkl_intel_lp64.a", "libmkl_sequential.a", "libmkl_core.a"];

const repo = join(dirname(fileURLToPath(import.meta.url)), "..");
const out = join(repo, ".mkl", "lib");
const stamp = join(out, ".wheel");

const warn = (why) => console.warn(`mkl-static: ${why}; building with OpenBLAS alone (GEMMs on Intel CPUs run slower than PyTorch's)`);

/** The members `names` of a zip archive, as buffers (stored or deflated, no zip64). */
export function unzip(zip, names) {
  const END = 0x06054b50, CENTRAL = 0x02014b50, LOCAL = 0x04034b50;
  let end = zip.length - 22;
  while (end >= 0 && zip.readUInt32LE(end) !== END) end--;
  if (end < 0) throw new Error("not a zip archive: no end of central directory");
  const found = new Map();
  let at = zip.readUInt32LE(end + 16);
  for (let i = zip.readUInt16LE(end + 10); i > 0; i--) {
    if (zip.readUInt32LE(at) !== CENTRAL) throw new Error(`bad central directory entry at ${at}`);
    const method = zip.readUInt16LE(at + 10), size = zip.readUInt32LE(at + 20), unpacked = zip.readUInt32LE(at + 24);
    const nameLength = zip.readUInt16LE(at + 28), extraLength = zip.readUInt16LE(at + 30), commentLength = zip.readUInt16LE(at + 32);
    const local = zip.readUInt32LE(at + 42);
    const name = zip.toString("utf8", at + 46, at + 46 + nameLength);
    at += 46 + nameLength + extraLength + commentLength;
    if (!names.includes(name)) continue;
    if (zip.readUInt32LE(local) !== LOCAL) throw new Error(`bad local header for ${name}`);
    const start = local + 30 + zip.readUInt16LE(local + 26) + zip.readUInt16LE(local + 28);
    const packed = zip.subarray(start, start + size);
    const data = method === 0 ? packed : method === 8 ? inflateRawSync(packed) : null;
    if (data === null || data.length !== unpacked) throw new Error(`cannot unpack ${name} (method ${method})`);
    found.set(name, data);
  }
  for (const name of names) if (!found.has(name)) throw new Error(`${name} is missing from the wheel`);
  return found;
}

async function main() {
  if (process.env.VIT_MAE_NO_MKL && process.env.VIT_MAE_NO_MKL !== "0") return warn("VIT_MAE_NO_MKL is set");
  if (process.env.MKL_STATIC_DIR) return console.log(`mkl-static: using MKL_STATIC_DIR=${process.env.MKL_STATIC_DIR}`);
  if (process.platform !== "linux" || process.arch !== "x64") return warn(`no pinned MKL wheel for ${process.platform}-${process.arch}`);
  if (existsSync(stamp) && readFileSync(stamp, "utf8") === WHEEL.sha256 && LIBRARIES.every((l) => existsSync(join(out, l)))) return;
  console.log(`mkl-static: fetching ${WHEEL.url.split("/").pop()} (250 MB)`);
  const response = await fetch(WHEEL.url);
  if (!response.ok) throw new Error(`HTTP ${response.status} from ${WHEEL.url}`);
  const wheel = Buffer.from(await response.arrayBuffer());
  const digest = createHash("sha256").update(wheel).digest("hex");
  if (digest !== WHEEL.sha256) throw new Error(`the wheel's sha256 is ${digest}, expected ${WHEEL.sha256}`);
  const members = unzip(wheel, LIBRARIES.map((l) => DATA + l));
  rmSync(stamp, { force: true });
  mkdirSync(out, { recursive: true });
  for (const library of LIBRARIES) {
    writeFileSync(join(out, `${library}.tmp`), members.get(DATA + library));
    renameSync(join(out, `${library}.tmp`), join(out, library));
  }
  writeFileSync(stamp, WHEEL.sha256);
  console.log(`mkl-static: ${LIBRARIES.join(", ")} in ${out}`);
}

// Run as a script (the build); imported, it only lends `unzip` to its test.
if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) main().catch((error) => warn(error.message));
