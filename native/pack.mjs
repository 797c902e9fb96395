#!/usr/bin/env node
// Stages and packs vit-mae for the npm registry the way napi-rs packages ship: a root
// package with the JavaScript, the types and the addon's loader but no addon, and one
// small package per platform holding only its `.node` file (plus the licences of what
// it links statically), listed as the root's optionalDependencies so that npm installs
// just the one that fits. The CUDA addon, when built, gets an optional package of its
// own, `vit-mae-linux-x64-gnu-cuda`, which is not listed: users who want it install it.
//
//   npm run build && npm run pack:release                # the CPU packages
//   npm run build:native:cuda && npm run pack:release    # and the CUDA one
//   node native/pack.mjs --out <dir> --cuda-addon <file> # a CUDA addon built elsewhere
//
// Writes into <dir> (default npm/, a build output): the staged packages (vit-mae/,
// linux-x64-gnu/, linux-x64-gnu-cuda/) and their tarballs, then prints each tarball's
// path, size and file count as JSON. The platform packages' manifests come from
// `napi create-npm-dirs`; the root's manifest is package.json with the
// optionalDependencies added and the development-only fields (scripts, devDependencies)
// left out, so nothing in an installed copy ever runs cargo. Nothing is published: the
// README's "Releasing" section says how.
import { execFileSync } from 'node:child_process';
import { copyFileSync, cpSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
function option(name, fallback) {
  const i = args.indexOf(name);
  if (i < 0) return fallback;
  if (i + 1 >= args.length) fail(`${name} needs a value`);
  return resolve(args[i + 1]);
}
function fail(message) {
  console.error(`pack: ${message}`);
  process.exit(1);
}
const unknown = args.filter((a, i) => a.startsWith('--') && !['--out', '--cuda-addon'].includes(a) && !['--out', '--cuda-addon'].includes(args[i - 1]));
if (unknown.length) fail(`unknown option ${unknown.join(', ')} (options: --out <dir>, --cuda-addon <file>)`);

const out = option('--out', join(repo, 'npm'));
const cudaAddon = option('--cuda-addon', join(repo, 'native/node/vit-mae.cuda.node'));
const cudaNamed = args.includes('--cuda-addon');
const manifest = JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8'));
const { binaryName, targets } = manifest.napi;

for (const file of ['dist/index.js', 'dist/index.d.ts', 'dist/cli.js', 'native/node/binding.cjs', 'native/node/binding.d.cts']) {
  if (!existsSync(join(repo, file))) fail(`${file} is missing: run \`npm run build\` first`);
}
if (cudaNamed && !existsSync(cudaAddon)) fail(`--cuda-addon names ${cudaAddon}, which does not exist`);

rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });

// The platform packages' folders and manifests, by napi-rs's own generator: it reads the
// `napi` field of the package.json it finds in its working directory.
writeFileSync(join(out, 'package.json'), JSON.stringify(manifest));
const napi = join(createRequire(import.meta.url).resolve('@napi-rs/cli/package.json'), '..', 'dist', 'cli.js');
execFileSync(process.execPath, [napi, 'create-npm-dirs', '--cwd', out, '--npm-dir', '.'], { stdio: 'pipe' });
rmSync(join(out, 'package.json'));

const platforms = readdirSync(out).filter((d) => existsSync(join(out, d, 'package.json')));
if (platforms.length !== targets.length) fail(`napi create-npm-dirs wrote ${platforms.length} packages for ${targets.length} targets`);
const optionalDependencies = {};
for (const platform of platforms) {
  const dir = join(out, platform);
  const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8'));
  const addon = join(repo, 'native/node', pkg.main);
  if (!existsSync(addon)) fail(`${relative(repo, addon)} is missing: build it on ${platform} (\`npm run build:native\`) or copy it there`);
  copyFileSync(addon, join(dir, pkg.main));
  addLicences(dir, pkg);
  optionalDependencies[pkg.name] = pkg.version;
}

// The CUDA package: the linux-x64-gnu manifest under its own name and file.
if (existsSync(cudaAddon)) {
  const cpu = JSON.parse(readFileSync(join(out, 'linux-x64-gnu', 'package.json'), 'utf8'));
  const file = `${binaryName}.linux-x64-gnu.cuda.node`;
  const pkg = {
    ...cpu,
    name: `${cpu.name}-cuda`,
    description: `The CUDA build of vit-mae's addon for linux-x64 glibc (NVIDIA driver, cuBLAS, cuRAND and NVRTC loaded at run time; without them vit-mae uses its CPU addon). ${manifest.description}`,
    main: file,
    files: [file],
  };
  const dir = join(out, 'linux-x64-gnu-cuda');
  mkdirSync(dir);
  copyFileSync(cudaAddon, join(dir, file));
  addLicences(dir, pkg);
  writeFileSync(join(dir, 'package.json'), `${JSON.stringify(pkg, null, 2)}\n`);
  writeFileSync(join(dir, 'README.md'), `# \`${pkg.name}\`\n\nThe CUDA build of [\`vit-mae\`](https://www.npmjs.com/package/vit-mae)'s native addon for x86_64 Linux (glibc). Install it beside \`vit-mae\` of the same version; \`nativeBackend()\` says whether it loaded.\n`);
  platforms.push('linux-x64-gnu-cuda');
}

// The root package: package.json's published fields, and the files it lists.
const root = join(out, 'vit-mae');
mkdirSync(root);
const { scripts: _scripts, devDependencies: _devDependencies, allowScripts: _allowScripts, ...published } = manifest;
writeFileSync(join(root, 'package.json'), `${JSON.stringify({ ...published, optionalDependencies }, null, 2)}\n`);
for (const file of ['README.md', 'LICENSE']) copyFileSync(join(repo, file), join(root, file));
for (const pattern of manifest.files) {
  const glob = /^(.*)\/\*(\.[\w.]+)$/.exec(pattern);
  if (glob) {
    for (const name of readdirSync(join(repo, glob[1])).filter((n) => n.endsWith(glob[2]))) {
      mkdirSync(join(root, glob[1]), { recursive: true });
      copyFileSync(join(repo, glob[1], name), join(root, glob[1], name));
    }
  } else {
    cpSync(join(repo, pattern), join(root, pattern), { recursive: true });
  }
}

const packed = [];
for (const dir of ['vit-mae', ...platforms]) {
  const [result] = JSON.parse(execFileSync('npm', ['pack', '--json', '--ignore-scripts', '--pack-destination', out], { cwd: join(out, dir), encoding: 'utf8' }));
  const tarball = join(out, result.filename);
  packed.push({ name: result.name, tarball, bytes: statSync(tarball).size, unpackedBytes: result.unpackedSize, files: result.files.map((f) => f.path).sort() });
}
console.log(JSON.stringify(packed, null, 2));

/** The licences of the BLAS libraries the addon links statically, which ship with it. */
function addLicences(dir, pkg) {
  cpSync(join(repo, 'licenses'), join(dir, 'licenses'), { recursive: true });
  copyFileSync(join(repo, 'LICENSE'), join(dir, 'LICENSE'));
  pkg.files = [...new Set([...pkg.files, 'licenses'])];
  writeFileSync(join(dir, 'package.json'), `${JSON.stringify(pkg, null, 2)}\n`);
}
