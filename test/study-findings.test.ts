// The results page's verdicts on the paper's findings (examples/study/findings.ts).
import { describe, expect, it } from 'vitest';
import { findings, PARTIAL_BLOCKS, seedMeans, targets, TIE, type RunNumbers, type ScheduleRun } from '../examples/study/findings.js';

const mae = (probe: number, knn: number, seconds = 300, epochs = 2): RunNumbers => ({ training: { seconds, epochs }, evaluation: { probe, knnWeighted: knn } });
/** Figure 7's runs of the full budget. */
const SCHEDULE: ScheduleRun[] = [
  { epochs: 1, id: 'sched-e1' },
  { epochs: 2, id: 'abl-r75' },
  { epochs: 4, id: 'mae-r75' },
  { epochs: 8, id: 'mae-r75-long' },
  { epochs: 16, id: 'sched-e16' },
];
const verdict = (runs: Map<string, RunNumbers>, claim: RegExp) => findings(runs, SCHEDULE).find((f) => claim.test(f.claim))!;
const tuned = (top1: number): RunNumbers => ({ test: { top1 }, training: { seconds: 800, epochs: 2 } });

describe('study findings', () => {
  it('are all "not run yet" without runs, with no explanation', () => {
    const all = findings(new Map(), SCHEDULE);
    expect(all).toHaveLength(13);
    for (const f of all) {
      expect(f.verdict).toBe('not run yet');
      expect(f.why).toBe('');
    }
  });

  it('read the mask-ratio curve: the peak at 75% reproduces, a peak at 90% partly, a peak at 25% not', () => {
    const runs = (p25: number, p50: number, p75: number, p90: number) =>
      new Map([
        ['abl-r25', mae(p25, p25)],
        ['abl-r50', mae(p50, p50)],
        ['abl-r75', mae(p75, p75)],
        ['abl-r90', mae(p90, p90)],
      ]);
    const ratio = /mask ratio/;
    expect(verdict(runs(0.7, 0.75, 0.8, 0.78), ratio).verdict).toBe('yes');
    // Within a tie of the best still counts as the peak.
    expect(verdict(runs(0.7, 0.75, 0.8, 0.8 + TIE / 2), ratio).verdict).toBe('yes');
    const at90 = verdict(runs(0.7, 0.75, 0.78, 0.8), ratio);
    expect(at90.verdict).toBe('partly');
    expect(at90.here).toContain('best probe at 90%');
    expect(at90.why).not.toBe('');
    expect(verdict(runs(0.82, 0.8, 0.78, 0.7), ratio).verdict).toBe('no');
  });

  it('call differences under the tie threshold ties, in either direction', () => {
    const target = /normalised pixels/;
    const runs = (norm: number, raw: number) => new Map([['abl-r75', mae(norm, norm)], ['abl-raw', mae(raw, raw)]]);
    expect(verdict(runs(0.8, 0.79), target).verdict).toBe('yes');
    expect(verdict(runs(0.8, 0.8 - TIE / 2), target).verdict).toBe('no');
    expect(verdict(runs(0.79, 0.8), target).verdict).toBe('no');
  });

  it('judge the PCA target against norm-pix pixels', () => {
    const pca = /PCA target/;
    const runs = (norm: [number, number], pcaRun: [number, number]) => new Map([['abl-r75', mae(...norm)], ['abl-pca', mae(...pcaRun)]]);
    expect(verdict(runs([0.8, 0.8], [0.78, 0.79]), pca)).toMatchObject({ verdict: 'yes', why: '' });
    const partly = verdict(runs([0.8, 0.8], [0.78, 0.8]), pca);
    expect(partly.verdict).toBe('partly');
    expect(partly.why).toMatch(/PCA target keeps the leading components/);
    expect(verdict(runs([0.8, 0.8], [0.82, 0.78]), pca).verdict).toBe('no');
    expect(verdict(new Map([['abl-r75', mae(0.8, 0.8)]]), pca).verdict).toBe('not run yet');
  });

  it('explain only the masking comparisons that fail', () => {
    const masking = /Random masking/;
    const runs = (block: number, grid: number) => new Map([['abl-r75', mae(0.8, 0.8)], ['abl-block', mae(block, block)], ['abl-grid', mae(grid, grid)]]);
    expect(verdict(runs(0.75, 0.76), masking)).toMatchObject({ verdict: 'yes', why: '' });
    const gridAhead = verdict(runs(0.75, 0.82), masking);
    expect(gridAhead.verdict).toBe('no');
    expect(gridAhead.why).toMatch(/^Random beats block masking here, as in the paper\. Grid masking keeps/);
    expect(gridAhead.why).not.toMatch(/Block masking at 75%/);
    const bothTie = verdict(runs(0.8, 0.8), masking).why;
    expect(bothTie).toMatch(/^Block masking at 75%.* Grid masking keeps/);
  });

  it('weigh both accuracy and speed for mask tokens in the encoder', () => {
    const tokens = /mask tokens/;
    const runs = (withTokens: RunNumbers) => new Map([['abl-r75', mae(0.8, 0.8, 300)], ['abl-encoder-mask-token', withTokens]]);
    const faster = verdict(runs(mae(0.7, 0.7, 900)), tokens);
    expect(faster.verdict).toBe('yes');
    expect(faster.here).toContain('3.00x less wall-clock');
    expect(verdict(runs(mae(0.8, 0.8, 400)), tokens).verdict).toBe('partly');
    const better = runs(mae(0.85, 0.85, 900));
    expect(verdict(better, tokens)).toMatchObject({ verdict: 'no', why: expect.stringMatching(/four times the encoder compute.*The speed-up reproduces: 3\.00x less/) });
    // Where the reference recipe took no longer than the run with mask tokens, the why compares them at equal wall-clock.
    better.set('mae-r75', { training: { seconds: 600, epochs: 4 }, evaluation: { probe: 0.86, knnWeighted: 0.87 } });
    expect(verdict(better, tokens).why).toContain('`mae-r75` (the same recipe, 4 epochs in 600 s against 900 s) reaches 86.0% / 87.0% (probe / kNN)');
    better.set('mae-r75', { training: { seconds: 1000, epochs: 4 }, evaluation: { probe: 0.86, knnWeighted: 0.87 } });
    expect(verdict(better, tokens).why).not.toContain('mae-r75');
    expect(verdict(runs(mae(0.85, 0.85, 400)), tokens).why).toMatch(/bounded by the decoder/);
  });

  it('compare fine-tuning with from-scratch test accuracy', () => {
    const ft = /from scratch/;
    const ftRun = (top1: number): RunNumbers => ({ test: { top1 }, training: { seconds: 800, epochs: 2 }, from: { seconds: 700, epochs: 4 } });
    const scratchRun = (top1: number): RunNumbers => ({ test: { top1 }, training: { seconds: 1650, epochs: 4 } });
    const runs = (a: number, b: number) => new Map<string, RunNumbers>([['ft-mae-r75', ftRun(a)], ['scratch', scratchRun(b)]]);
    expect(verdict(runs(0.9, 0.88), ft).verdict).toBe('yes');
    expect(verdict(runs(0.9, 0.9), ft).verdict).toBe('partly');
    expect(verdict(runs(0.88, 0.9), ft).verdict).toBe('no');
    // The long budget counts once both of its runs have finished.
    const both = runs(0.88, 0.9);
    both.set('ft-mae-r75-long', ftRun(0.91));
    expect(verdict(both, ft).verdict).toBe('no');
    both.set('scratch-long', scratchRun(0.9));
    const mixed = verdict(both, ft);
    expect(mixed.verdict).toBe('partly');
    expect(mixed.here).toBe('reference budget: 88.0% fine-tuned against 90.0% from scratch (in 110% of the time); long budget: 91.0% fine-tuned against 90.0% from scratch (in 110% of the time)');
  });

  it('explain fine-tuning against from scratch by the budgets where it falls behind and how the gap moves', () => {
    const ft = /from scratch/;
    const ftRun = (top1: number, preTraining: number, epochs: number): RunNumbers => ({ test: { top1 }, training: { seconds: 800, epochs: 2 }, from: { seconds: preTraining, epochs } });
    const scratchRun = (top1: number): RunNumbers => ({ test: { top1 }, training: { seconds: 1500, epochs: 4 } });
    const runs = (ftLong: number, scratchLong: number) =>
      new Map<string, RunNumbers>([
        ['ft-mae-r75', ftRun(0.85, 700, 4)],
        ['scratch', scratchRun(0.86)],
        ['ft-mae-r75-long', ftRun(ftLong, 1400, 8)],
        ['scratch-long', scratchRun(scratchLong)],
      ]);
    const narrows = verdict(runs(0.872, 0.869), ft);
    expect(narrows.verdict).toBe('no');
    expect(narrows.why).toContain('At the reference budget, a 1M-parameter ViT');
    expect(narrows.why).toContain('From the reference budget (4 + 2 epochs of pre-training and fine-tuning) to the long budget (8 + 2), MAE + fine-tuning gains 2.2 points and from scratch 0.9 points, so fine-tuned minus from scratch goes from -1.0 points to +0.3 points:');
    expect(narrows.why).toContain('With one seed per run, we read no more');
    expect(verdict(runs(0.88, 0.869), ft).why).toContain('goes from -1.0 points to +1.1 points:');
    expect(verdict(runs(0.86, 0.869), ft).why).toContain('goes from -1.0 points to -0.9 points:');
    // Second seeds of the long budget's runs: their means, and the sentence says which runs have two.
    const seeded = runs(0.872, 0.869);
    seeded.set('ft-mae-r75-long-s1', ftRun(0.878, 1400, 8));
    seeded.set('scratch-long-s1', scratchRun(0.863));
    const means = verdict(seeded, ft);
    expect(means.here).toContain('long budget: 87.5% fine-tuned against 86.6% from scratch');
    expect(means.why).toContain('gains 2.5 points and from scratch 0.6 points, so fine-tuned minus from scratch goes from -1.0 points to +0.9 points:');
    expect(means.why).toContain('With two seeds for some of these runs and one for the others, we read no more');
    const behindTwice = verdict(runs(0.86, 0.88), ft);
    expect(behindTwice.why).toContain('At the reference budget and the long budget, a 1M-parameter ViT');
    expect(behindTwice.why).toContain('from scratch 2.0 points: the gap does not narrow at these budgets.');
    const referenceOnly = new Map([...runs(0.87, 0.87)].filter(([id]) => !id.endsWith('-long')));
    expect(verdict(referenceOnly, ft).why).not.toContain('From the reference budget');
  });

  it('read Table 1e: cropping helps and color jitter does not', () => {
    const augmentation = /Cropping helps/;
    const runs = (none: number, fixed: number, rand: number, jitter: number) =>
      new Map([
        ['aug-none', mae(none, none)],
        ['abl-r75', mae(0.8, 0.8)],
        ['aug-crop-fixed', mae(fixed, fixed)],
        ['aug-crop-rand', mae(rand, rand)],
        ['aug-crop-jitter', mae(jitter, jitter)],
      ]);
    expect(verdict(runs(0.75, 0.78, 0.79, 0.79), augmentation)).toMatchObject({ verdict: 'yes', why: '' });
    // Both crops help but jitter helps too.
    const jitter = verdict(runs(0.75, 0.78, 0.79, 0.81), augmentation);
    expect(jitter.verdict).toBe('partly');
    expect(jitter.why).toMatch(/^On one channel, color jitter is brightness and contrast only/);
    // One crop helps, the other ties.
    expect(verdict(runs(0.75, 0.75 + TIE / 2, 0.79, 0.79), augmentation).verdict).toBe('partly');
    const cropsHurt = verdict(runs(0.8, 0.78, 0.79, 0.79), augmentation);
    expect(cropsHurt.verdict).toBe('no');
    expect(cropsHurt.why).toMatch(/^Fashion-MNIST's items are centred/);
    expect(cropsHurt.here).toBe('probe / kNN: none 80.0% / 80.0%, flips only 80.0% / 80.0%, crop fixed 78.0% / 78.0%, crop random 79.0% / 79.0%, crop + color jitter 79.0% / 79.0%');
  });

  it('read Figure 9 after MAE: one block closes at least half of the gap, some of it, or none', () => {
    const nonLinear = /not linear/;
    const runs = (top1: number[]) => new Map(PARTIAL_BLOCKS.map((b, i) => [`partial-mae-b${b}`, tuned(top1[i])]));
    const most = verdict(runs([0.8, 0.85, 0.86, 0.87, 0.88]), nonLinear);
    expect(most.verdict).toBe('yes');
    expect(most.here).toBe('top-1 with 0 / 1 / 2 / 4 / 6 blocks tuned: 80.0% / 85.0% / 86.0% / 87.0% / 88.0%; one block closes 62% of the gap between none and all');
    expect(verdict(runs([0.8, 0.82, 0.84, 0.86, 0.88]), nonLinear).verdict).toBe('partly');
    expect(verdict(runs([0.8, 0.8, 0.84, 0.86, 0.88]), nonLinear).verdict).toBe('no');
    // No gap between none and all: nothing for one block to close.
    const flat = verdict(runs([0.8, 0.8, 0.8, 0.8, 0.8 + TIE / 2]), nonLinear);
    expect(flat.verdict).toBe('no');
    expect(flat.why).toMatch(/^Tuning every block gains nothing/);
  });

  it('compare Figure 9 after MAE with random init at every block count', () => {
    const againstRandom = /random-init encoder at every number/;
    const runs = (random: number[]) =>
      new Map([
        ...PARTIAL_BLOCKS.map((b): [string, RunNumbers] => [`partial-mae-b${b}`, tuned(0.85)]),
        ...PARTIAL_BLOCKS.map((b, i): [string, RunNumbers] => [`partial-random-b${b}`, tuned(random[i])]),
      ]);
    expect(verdict(runs([0.7, 0.75, 0.8, 0.82, 0.84]), againstRandom)).toMatchObject({ verdict: 'yes', why: '' });
    const tieAtAll = verdict(runs([0.7, 0.75, 0.8, 0.82, 0.85]), againstRandom);
    expect(tieAtAll.verdict).toBe('partly');
    expect(tieAtAll.why).toMatch(/^MAE is not ahead with 6 block\(s\) tuned\./);
    expect(verdict(runs([0.7, 0.75, 0.8, 0.82, 0.87]), againstRandom).verdict).toBe('no');
  });

  it('read Figure 7: every longer schedule higher, some higher and none lower, or one lower', () => {
    const schedule = /Longer pre-training/;
    const runs = (acc: number[]) => new Map(SCHEDULE.map((s, i) => [s.id, mae(acc[i], acc[i], 100 * s.epochs, s.epochs)]));
    const rising = verdict(runs([0.7, 0.75, 0.8, 0.83, 0.85]), schedule);
    expect(rising.verdict).toBe('yes');
    expect(rising.here).toBe('probe / kNN after 1 epoch(s) 70.0% / 70.0%, 2 epoch(s) 75.0% / 75.0%, 4 epoch(s) 80.0% / 80.0%, 8 epoch(s) 83.0% / 83.0%, 16 epoch(s) 85.0% / 85.0%');
    expect(verdict(runs([0.7, 0.75, 0.8, 0.83, 0.83]), schedule).verdict).toBe('partly');
    expect(verdict(runs([0.7, 0.75, 0.8, 0.83, 0.82]), schedule).verdict).toBe('no');
  });

  it('read the mask ratio at equal wall-clock: the better high ratio against the better low one', () => {
    const wallClock = /equal wall-clock, a high mask ratio/;
    const runs = (r25: number, r50: number, r75: number, r90: number) =>
      new Map([
        ['wc-r25', mae(r25, r25, 357, 0.98)],
        ['wc-r50', mae(r50, r50, 355, 1.46)],
        ['abl-r75', mae(r75, r75, 357, 2)],
        ['wc-r90', mae(r90, r90, 356, 3.57)],
      ]);
    const high = verdict(runs(0.76, 0.77, 0.785, 0.79), wallClock);
    expect(high.verdict).toBe('yes');
    expect(high.here).toBe('probe / kNN in 357 s of `abl-r75`: 25% (0.98 epochs) 76.0% / 76.0%, 50% (1.46 epochs) 77.0% / 77.0%, 75% (2 epochs) 78.5% / 78.5%, 90% (3.57 epochs) 79.0% / 79.0%');
    const mixed = runs(0.76, 0.77, 0.785, 0.79);
    mixed.set('wc-r50', mae(0.77, 0.79, 355, 1.46));
    expect(verdict(mixed, wallClock).verdict).toBe('partly');
    expect(verdict(runs(0.8, 0.77, 0.785, 0.79), wallClock).verdict).toBe('no');
  });

  it('read the mean of two seeds where the second has finished', () => {
    const target = /normalised pixels/;
    const runs = new Map([['abl-r75', mae(0.8, 0.8)], ['abl-raw', mae(0.79, 0.79)]]);
    expect(verdict(runs, target).verdict).toBe('yes');
    // Seed 1 of the raw target is ahead: the means tie.
    runs.set('abl-raw-s1', mae(0.81, 0.81));
    const mean = verdict(runs, target);
    expect(mean.verdict).toBe('no');
    expect(mean.here).toBe('probe / kNN: norm-pix 80.0% / 80.0%, raw 80.0% / 80.0%');
    expect(seedMeans(runs).get('abl-raw')!.evaluation).toEqual({ probe: 0.8, knnWeighted: 0.8 });
    expect(seedMeans(runs).get('abl-r75')).toBe(runs.get('abl-r75'));
    // Fine-tuning's test accuracy averages too.
    const ft = seedMeans(new Map([['ft-mae-r75-long', tuned(0.86)], ['ft-mae-r75-long-s1', tuned(0.88)]]));
    expect(ft.get('ft-mae-r75-long')!.test!.top1).toBeCloseTo(0.87, 12);
  });

  it('check the targets against the reference run and PyTorch on this machine', () => {
    const reference = { probe: 0.817, knn: 0.815, seconds: 580 };
    const runs = new Map<string, RunNumbers>([
      ['mae-r75', mae(0.818, 0.81, 674)],
      ['pytorch-r75', { training: { seconds: 692, epochs: 4 } }],
      ['mae-r75-long', mae(0.83, 0.82, 1348)],
    ]);
    const all = targets(runs, reference);
    expect(all.map((t) => t.met)).toEqual(['yes', 'no', 'no', 'yes', 'not run yet', 'not run yet', 'yes']);
    expect(all[2].here).toBe('674 s on this machine');
    expect(all[3].here).toBe('674 s against 692 s (0.97x the time)');
  });
});
