// The results page's verdicts on the paper's findings (examples/study/findings.ts).
import { describe, expect, it } from 'vitest';
import { findings, targets, TIE, type RunNumbers } from '../examples/study/findings.js';

const mae = (probe: number, knn: number, seconds = 300): RunNumbers => ({ training: { seconds, epochs: 2 }, evaluation: { probe, knnWeighted: knn } });
const verdict = (runs: Map<string, RunNumbers>, claim: RegExp) => findings(runs).find((f) => claim.test(f.claim))!;

describe('study findings', () => {
  it('are all "not run yet" without runs, with no explanation', () => {
    const all = findings(new Map());
    expect(all).toHaveLength(7);
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
    const ftRun = (top1: number): RunNumbers => ({ test: { top1 }, training: { seconds: 800, epochs: 2 }, from: { seconds: 700 } });
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
    const ftRun = (top1: number, preTraining: number): RunNumbers => ({ test: { top1 }, training: { seconds: 800, epochs: 2 }, from: { seconds: preTraining } });
    const scratchRun = (top1: number): RunNumbers => ({ test: { top1 }, training: { seconds: 1500, epochs: 4 } });
    const runs = (ftLong: number, scratchLong: number) =>
      new Map<string, RunNumbers>([
        ['ft-mae-r75', ftRun(0.85, 700)],
        ['scratch', scratchRun(0.86)],
        ['ft-mae-r75-long', ftRun(ftLong, 1400)],
        ['scratch-long', scratchRun(scratchLong)],
      ]);
    const narrows = verdict(runs(0.872, 0.869), ft);
    expect(narrows.verdict).toBe('no');
    expect(narrows.why).toContain('At the reference budget, a 1M-parameter ViT');
    expect(narrows.why).toContain('From the reference budget (1500 s) to the long budget (2200 s), MAE + fine-tuning gains 2.2 points and from scratch 0.9 points, so the gap closes to a tie:');
    expect(verdict(runs(0.88, 0.869), ft).why).toContain('so the gap turns in MAE\'s favour:');
    expect(verdict(runs(0.86, 0.869), ft).why).toContain('so the gap narrows:');
    const behindTwice = verdict(runs(0.86, 0.88), ft);
    expect(behindTwice.why).toContain('At the reference budget and the long budget, a 1M-parameter ViT');
    expect(behindTwice.why).toContain('from scratch 2.0 points: the gap does not narrow at these budgets.');
    const referenceOnly = new Map([...runs(0.87, 0.87)].filter(([id]) => !id.endsWith('-long')));
    expect(verdict(referenceOnly, ft).why).not.toContain('From the reference budget');
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
