// native/mkl-static.mjs, which fetches MKL's static libraries before a native build: its
// zip reader, and that it never fails the build.
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
// @ts-expect-error: a plain ES module without types
import { unzip } from '../native/mkl-static.mjs';
import { zip } from './helpers.js';

const script = join(dirname(fileURLToPath(import.meta.url)), '..', 'native', 'mkl-static.mjs');

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
