// The Fashion-MNIST study script (examples/study.ts) end to end at its --quick budget, on
// the shipped Fashion-MNIST subset: every run the results page reports, the page, its
// plots and reconstruction grids, resuming from finished runs, and the page rewritten from
// the committed copies of the runs alone.
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');

/** The runs of issues 7 and 22 at the quick budget; `pytorch-r75` needs PyTorch, which this test hides. */
const RUNS = [
  'random-init',
  'mae-r75',
  'ft-mae-r75',
  'scratch',
  'abl-r75',
  'abl-r25',
  'abl-r50',
  'abl-r90',
  'abl-dec1',
  'abl-dec4',
  'abl-raw',
  'abl-pca',
  'abl-block',
  'abl-grid',
  'abl-encoder-mask-token',
  'mae-r75-long',
  'ft-mae-r75-long',
  'scratch-long',
  'aug-none',
  'aug-crop-fixed',
  'aug-crop-rand',
  'aug-crop-jitter',
  ...['mae', 'random'].flatMap((from) => [0, 1, 2, 4, 6].map((blocks) => `partial-${from}-b${blocks}`)),
  'wc-r25',
  'wc-r50',
  'wc-r90',
  // The quick schedule is 0.5, 1 and 2 epochs: 1 is mae-r75, 2 mae-r75-long.
  'sched-e0.5',
  ...['abl-r75', 'abl-raw', 'abl-dec1', 'abl-dec4', 'abl-r50', 'mae-r75-long', 'ft-mae-r75-long', 'scratch-long'].map((id) => `${id}-s1`),
];
/** Runs that train, and so keep a curve. */
const TRAINED = RUNS.filter((id) => id !== 'random-init');

describe('the study script at its --quick budget', () => {
  let tmp: string;
  let out: string;
  let docs: string;
  const study = (extra: string[] = []) =>
    promisify(execFile)(process.execPath, [join(ROOT, 'node_modules/tsx/dist/cli.mjs'), 'examples/study.ts', '--quick', '--data', join(ROOT, 'data/fashion-mnist'), '--out', out, '--docs', docs, ...extra], {
      cwd: ROOT,
      env: { ...process.env, VIT_MAE_PYTHON: join(tmp, 'no-python') },
      maxBuffer: 64 << 20,
    });
  const resultOf = (id: string) => join(out, id, 'result.json');
  const storedOf = (id: string) => join(docs, 'results', 'runs', `${id}.json`);

  beforeAll(() => {
    tmp = mkdtempSync(join(tmpdir(), 'vit-mae-study-'));
    out = join(tmp, 'runs');
    docs = join(tmp, 'docs');
  });
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  // About 7 minutes on two idle cores (43 runs); twice that where other builds share them.
  it('runs every run, writes the page with its plots and grids, and skips finished runs when rerun', { timeout: 1_800_000 }, async () => {
    const first = await study();
    for (const id of RUNS) expect(existsSync(resultOf(id)), `${id} finished`).toBe(true);
    expect(first.stdout).toMatch(/pytorch-r75[\s\S]*skipped: .*no-python/);
    expect(existsSync(resultOf('pytorch-r75'))).toBe(false);

    const page = readFileSync(join(docs, 'results.md'), 'utf8');
    expect(page).toContain('--quick budget: a pipeline test, not results');
    // Every run has its row in the table of runs, with the commit it ran at.
    for (const id of RUNS) expect(page).toMatch(new RegExp(`^\\| \`${id}\` \\| [^|]+ \\| [0-9a-f]{7,}\\+? \\|`, 'm'));
    expect(page).toMatch(/^\| `pytorch-r75` \| [^|]+ \| not run yet \|/m);
    // Every finding has a verdict (none needs PyTorch).
    const findings = page.slice(page.indexOf('## The paper'), page.indexOf('## MAE pre-training against'));
    const verdicts = findings.split('\n').filter((line) => line.startsWith('| ') && !line.startsWith('| Finding') && !line.startsWith('| ---')).map((row) => row.split(' | ').pop());
    expect(verdicts).toHaveLength(13);
    for (const verdict of verdicts) expect(verdict).toMatch(/^(yes|\*\*partly\*\*|\*\*no\*\*) \|$/);
    // Every image the page shows exists, among them the plots and one grid per masking strategy.
    const images = [...page.matchAll(/\]\((results\/[^)]+)\)/g)].map((m) => m[1]);
    expect(images).toEqual(
      expect.arrayContaining([
        'results/accuracy-vs-mask-ratio.svg', 'results/loss-mask-ratio.svg', 'results/reconstruction-random.png', 'results/reconstruction-block.png', 'results/reconstruction-grid.png',
        'results/loss-augmentation.svg', 'results/accuracy-vs-epochs.svg', 'results/accuracy-vs-blocks.svg', 'results/accuracy-vs-mask-ratio-wall-clock.svg',
      ]),
    );
    for (const image of images) expect(statSync(join(docs, image)).size, image).toBeGreaterThan(100);
    // Both seeds of every seeded row, with their difference.
    expect(page.match(/^\| `[^`]+`, `[^`]+-s1` \| [^|]+ \| \d+\.\d% \| \d+\.\d% \| \d+\.\d \| \d+\.\d% \|$/gm)).toHaveLength(14);
    // The wall-clock runs train for abl-r75's seconds at their own ratio's pace.
    const seconds = (id: string) => JSON.parse(readFileSync(resultOf(id), 'utf8')).training;
    for (const ratio of [25, 50, 90]) {
      const pace = seconds(`abl-r${ratio}`);
      expect(seconds(`wc-r${ratio}`).epochs).toBeCloseTo(seconds('abl-r75').seconds / (pace.seconds / pace.epochs), 1);
    }

    // Every run's committed copy: its result.json, its curve thinned to at most 400 points, and the CPU it ran on.
    for (const id of RUNS) {
      const { curve, ...result } = JSON.parse(readFileSync(storedOf(id), 'utf8'));
      expect(result, id).toEqual(JSON.parse(readFileSync(resultOf(id), 'utf8')));
      expect(result.cpu, id).toEqual(expect.any(String));
      if (!TRAINED.includes(id)) continue;
      const full = readFileSync(join(out, id, 'curve.jsonl'), 'utf8').trim().split('\n').map((line) => JSON.parse(line));
      expect(curve.length, id).toBe(Math.min(400, full.length));
      expect(curve[0]).toEqual(full[0]);
      expect(curve.at(-1)).toEqual(full.at(-1));
    }

    const before = RUNS.map((id) => readFileSync(resultOf(id), 'utf8'));
    const second = await study();
    for (const id of RUNS) expect(second.stdout).toContain(`${id}: done before, skipped`);
    expect(RUNS.map((id) => readFileSync(resultOf(id), 'utf8'))).toEqual(before);
    expect(readFileSync(join(docs, 'results.md'), 'utf8')).toContain('## Every run');

    // Without runs/, the page comes from the committed copies: the same numbers. A chart
    // whose runs have no curves (as restored runs) keeps the one drawn before.
    for (const id of ['abl-r25', 'abl-r50', 'abl-r75', 'abl-r90']) {
      const { curve, ...restored } = JSON.parse(readFileSync(storedOf(id), 'utf8'));
      expect(curve.length).toBeGreaterThan(1);
      writeFileSync(storedOf(id), JSON.stringify(restored));
    }
    writeFileSync(join(docs, 'results', 'loss-mask-ratio.svg'), '<svg><!-- drawn before --></svg>'.padEnd(200));
    rmSync(out, { recursive: true });
    await study(['--report']);
    const again = readFileSync(join(docs, 'results.md'), 'utf8');
    const numbers = (text: string) => text.slice(text.indexOf('## Targets'));
    expect(numbers(again)).toEqual(numbers(page));
    expect(readFileSync(join(docs, 'results', 'loss-mask-ratio.svg'), 'utf8')).toContain('drawn before');
    expect(again).toContain('![Pre-training loss by mask ratio](results/loss-mask-ratio.svg)');
  });
});
