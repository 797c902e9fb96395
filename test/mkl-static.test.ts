// native/mkl-static.mjs, which fetches MKL's static libraries before a native build: its
// zip reader, and that it never fails the build.
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { deflateRawSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
// @ts-expect-error: a plain ES module without types
import { unzip } from '../native/mkl-static.mjs';

const script = join(dirname(fileURLToPath(import.meta.url)), '..', 'native', 'mkl-static.mjs');

/** A zip archive of `members` (name, data, method 0 = stored or 8 = deflated), as the format lays it out. */
function zip(members: [string, Buffer, number][]): Buffer {
  const locals: Buffer[] = [];
  const centrals: Buffer[] = [];
  let offset = 0;
  for (const [name, data, method] of members) {
    const packed = method === 8 ? deflateRawSync(data) : data;
    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(method, 8);
    local.writeUInt32LE(packed.length, 18);
    local.writeUInt32LE(data.length, 22);
    local.writeUInt16LE(name.length, 26);
    const central = Buffer.alloc(46);
    central.writeUInt32LE(0x02014b50, 0);
    central.writeUInt16LE(method, 10);
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
  end.writeUInt16LE(members.length, 10);
  end.writeUInt32LE(directory.length, 12);
  end.writeUInt32LE(offset, 16);
  return Buffer.concat([...locals, directory, end]);
}

describe('mkl-static.mjs', () => {
  const lib = Buffer.from('!<arch>\n' + 'x'.repeat(5000));
  const archive = zip([
    ['a/LICENSE.txt', Buffer.from('licence'), 0],
    ['a/lib/libmkl_core.a', lib, 8],
    ['a/lib/libmkl_sequential.a', Buffer.from('seq'), 0],
  ]);

  it('reads the members it is asked for, stored or deflated', () => {
    const members: Map<string, Buffer> = unzip(archive, ['a/lib/libmkl_core.a', 'a/lib/libmkl_sequential.a']);
    expect([...members.keys()].sort()).toEqual(['a/lib/libmkl_core.a', 'a/lib/libmkl_sequential.a']);
    expect(members.get('a/lib/libmkl_core.a')).toEqual(lib);
    expect(members.get('a/lib/libmkl_sequential.a')?.toString()).toBe('seq');
  });

  it('names a missing member, and refuses what is not a zip', () => {
    expect(() => unzip(archive, ['a/lib/libmkl_intel_lp64.a'])).toThrow('a/lib/libmkl_intel_lp64.a is missing from the wheel');
    expect(() => unzip(Buffer.from('not a zip archive at all, just text'), ['x'])).toThrow(/no end of central directory/);
  });

  it('warns and succeeds when told not to fetch, so the build goes on with OpenBLAS', () => {
    const run = spawnSync(process.execPath, [script], { encoding: 'utf8', env: { ...process.env, VIT_MAE_NO_MKL: '1' } });
    expect(run.status).toBe(0);
    expect(run.stderr).toMatch(/VIT_MAE_NO_MKL is set; building with OpenBLAS alone/);
  });
});
