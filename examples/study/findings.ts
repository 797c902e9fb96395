// The paper's findings and the study's targets checked against its runs: what He et al.
// (2021) report, what the runs here measured, and whether the finding reproduces at this
// scale. The verdicts are computed from the numbers; the explanations of the findings
// that do not reproduce are ours, and say what we think is different at this scale.

/** The numbers of one finished run that the findings read. */
export interface RunNumbers {
  training?: { seconds: number; epochs: number };
  evaluation?: { probe: number; knnWeighted: number };
  test?: { top1: number };
}

/**
 * Accuracy differences smaller than this are called ties. One standard error of an
 * accuracy near 85% on 10,000 test images is 0.36 points, and every run here has one
 * seed, so half a point is about the smallest difference worth reading.
 */
export const TIE = 0.005;

type Order = 'higher' | 'tie' | 'lower';
function order(a: number, b: number): Order {
  return a - b > TIE ? 'higher' : b - a > TIE ? 'lower' : 'tie';
}

export type Verdict = 'yes' | 'partly' | 'no' | 'not run yet';

export interface Finding {
  /** The claim, with where the paper makes it. */
  claim: string;
  /** What the paper measured (ViT-L on ImageNet-1k unless it says otherwise). */
  paper: string;
  /** What the runs here measured. */
  here: string;
  verdict: Verdict;
  /** Why we think it does not (fully) reproduce; empty where it does. */
  why: string;
}

const pct = (v: number) => `${(v * 100).toFixed(1)}%`;

/** The reference PyTorch run the targets are set against (issue 7). */
export interface Reference {
  probe: number;
  knn: number;
  /** Seconds of training, on another 2-core machine. */
  seconds: number;
}

export interface Target {
  target: string;
  here: string;
  met: 'yes' | 'no' | 'not run yet';
}

/**
 * The study's targets: the reference recipe matches or beats the reference run's accuracy
 * in less wall-clock time, fine-tuning is at or above from scratch for the same budget,
 * and a longer budget goes further.
 */
export function targets(runs: Map<string, RunNumbers>, reference: Reference): Target[] {
  const m = runs.get('mae-r75');
  const pt = runs.get('pytorch-r75')?.training;
  const ft = runs.get('ft-mae-r75')?.test?.top1;
  const sc = runs.get('scratch')?.test?.top1;
  const long = runs.get('mae-r75-long')?.evaluation;
  const met = (ok: boolean | undefined) => (ok === undefined ? 'not run yet' : ok ? 'yes' : 'no');
  return [
    { target: `Linear probe after MAE (\`mae-r75\`) at or above the reference's ${pct(reference.probe)}`, here: m?.evaluation ? pct(m.evaluation.probe) : '–', met: met(m?.evaluation && m.evaluation.probe >= reference.probe) },
    { target: `kNN after MAE at or above the reference's ${pct(reference.knn)}`, here: m?.evaluation ? pct(m.evaluation.knnWeighted) : '–', met: met(m?.evaluation && m.evaluation.knnWeighted >= reference.knn) },
    {
      target: `Pre-training in less wall-clock than the reference run (${reference.seconds} s on another 2-core machine)`,
      here: m?.training ? `${m.training.seconds.toFixed(0)} s on this machine` : '–',
      met: met(m?.training && m.training.seconds < reference.seconds),
    },
    {
      target: 'Pre-training in less wall-clock than PyTorch eager with the same recipe on this machine (`pytorch-r75`)',
      here: m?.training && pt ? `${m.training.seconds.toFixed(0)} s against ${pt.seconds.toFixed(0)} s (${(m.training.seconds / pt.seconds).toFixed(2)}x the time)` : '–',
      met: met(m?.training && pt && m.training.seconds < pt.seconds),
    },
    { target: 'MAE + fine-tuning at or above supervised from scratch for the same wall-clock', here: ft !== undefined && sc !== undefined ? `${pct(ft)} against ${pct(sc)}` : '–', met: met(ft !== undefined && sc !== undefined ? ft >= sc - TIE : undefined) },
    {
      target: 'A longer budget goes further (`mae-r75-long` above `mae-r75` in probe and kNN)',
      here: long && m?.evaluation ? `probe ${pct(long.probe)}, kNN ${pct(long.knnWeighted)}` : '–',
      met: met(long && m?.evaluation ? order(long.probe, m.evaluation.probe) === 'higher' && order(long.knnWeighted, m.evaluation.knnWeighted) === 'higher' : undefined),
    },
  ];
}

/** The findings, in the order of the results page, from the runs by id. */
export function findings(runs: Map<string, RunNumbers>): Finding[] {
  const probe = (id: string) => runs.get(id)?.evaluation?.probe;
  const knn = (id: string) => runs.get(id)?.evaluation?.knnWeighted;
  const both = (id: string) => (runs.get(id)?.evaluation ? `${pct(probe(id)!)} / ${pct(knn(id)!)}` : '–');
  const missing = (...ids: string[]) => ids.some((id) => !runs.get(id)?.evaluation && !runs.get(id)?.test);
  const out: Finding[] = [];

  // MAE against a random encoder.
  {
    const claim = 'MAE pre-training gives far better frozen features than the same encoder randomly initialised';
    const paper = 'ViT-L linear probe 73.5% after MAE (Table 1); the paper gives no random-encoder number';
    if (missing('random-init', 'mae-r75')) out.push({ claim, paper, here: '–', verdict: 'not run yet', why: '' });
    else {
      const up = order(probe('mae-r75')!, probe('random-init')!) === 'higher' && order(knn('mae-r75')!, knn('random-init')!) === 'higher';
      out.push({
        claim,
        paper,
        here: `probe / kNN: random ${both('random-init')}, MAE ${both('mae-r75')}`,
        verdict: up ? 'yes' : 'no',
        why: up ? '' : 'A random ViT on 32x32 Fashion-MNIST is already a strong random-feature model: the items are centred on a plain background, so even random projections of the patches separate most classes.',
      });
    }
  }

  // Fine-tuning against supervised from scratch.
  {
    const claim = 'MAE pre-training + fine-tuning beats supervised training from scratch for the same budget (Section 4, Table 3)';
    const paper = 'ViT-L: 85.9% fine-tuned against 82.5% from scratch (with strong regularisation)';
    const ft = runs.get('ft-mae-r75')?.test?.top1;
    const sc = runs.get('scratch')?.test?.top1;
    if (ft === undefined || sc === undefined) out.push({ claim, paper, here: '–', verdict: 'not run yet', why: '' });
    else {
      const o = order(ft, sc);
      out.push({
        claim,
        paper,
        here: `${pct(ft)} fine-tuned against ${pct(sc)} from scratch`,
        verdict: o === 'higher' ? 'yes' : o === 'tie' ? 'partly' : 'no',
        why:
          o === 'higher'
            ? ''
            : 'The paper\'s gap comes from ViT-L on ImageNet, where supervised ViTs overfit and pre-training runs for hundreds of epochs. A 1M-parameter ViT on 60,000 simple images for half an hour is limited by its budget, not by its data, and labels from the first step use a short budget better than reconstruction does.',
      });
    }
  }

  // Mask ratio.
  {
    const ratios = [
      { id: 'abl-r25', ratio: 25 },
      { id: 'abl-r50', ratio: 50 },
      { id: 'abl-r75', ratio: 75 },
      { id: 'abl-r90', ratio: 90 },
    ];
    const claim = 'A high mask ratio works best: about 75% for linear probing, which rises with the ratio up to there (Figure 5)';
    const paper = 'linear probe peaks at 75%, far above 25-50%';
    if (missing(...ratios.map((r) => r.id))) out.push({ claim, paper, here: '–', verdict: 'not run yet', why: '' });
    else {
      const best = (key: (id: string) => number | undefined) => ratios.reduce((a, b) => (key(b.id)! > key(a.id)! ? b : a));
      const bestProbe = best(probe);
      const bestKnn = best(knn);
      const atTop = (key: (id: string) => number | undefined, top: { id: string }) => order(key('abl-r75')!, key(top.id)!) !== 'lower';
      const high = (r: { ratio: number }) => r.ratio >= 75;
      const verdict: Verdict =
        atTop(probe, bestProbe) && atTop(knn, bestKnn) ? 'yes' : high(bestProbe) || high(bestKnn) ? 'partly' : 'no';
      out.push({
        claim,
        paper,
        here: `best probe at ${bestProbe.ratio}%, best kNN at ${bestKnn.ratio}% (probe / kNN: ${ratios.map((r) => `${r.ratio}% ${both(r.id)}`).join(', ')})`,
        verdict,
        why:
          verdict === 'yes'
            ? ''
            : 'Every ratio trains for the same epochs, so lower ratios get more encoder compute (at 25% the encoder sees three times the patches of 75%); over two epochs that extra compute counts for more than it does after the paper\'s 800. And a 4x4 patch of a smooth, centred item is easy to infer from its neighbours, so the task stays hard enough to learn from at lower ratios than on ImageNet.',
      });
    }
  }

  // Decoder depth.
  {
    const ids = ['abl-dec1', 'abl-r75', 'abl-dec4'];
    const claim = 'A deeper decoder improves linear probing (Table 1a)';
    const paper = 'depth 1 / 2 / 4: 65.5% / 70.0% / 71.9%';
    if (missing(...ids)) out.push({ claim, paper, here: '–', verdict: 'not run yet', why: '' });
    else {
      const steps = [order(probe(ids[1])!, probe(ids[0])!), order(probe(ids[2])!, probe(ids[1])!)];
      const verdict: Verdict = steps.every((o) => o === 'higher') ? 'yes' : steps.some((o) => o === 'higher') && !steps.includes('lower') ? 'partly' : 'no';
      out.push({
        claim,
        paper,
        here: `depth 1 / 2 / 4 probe: ${ids.map((id) => pct(probe(id)!)).join(' / ')}; kNN: ${ids.map((id) => pct(knn(id)!)).join(' / ')}`,
        verdict,
        why:
          verdict === 'yes'
            ? ''
            : 'The paper\'s argument is that a deep decoder takes over the pixel-level detail so that the encoder\'s last layers stay abstract. Fashion-MNIST at 32x32 has little pixel-level detail to take over, and two epochs are too few for a deeper decoder to learn more than a shallow one.',
      });
    }
  }

  // Reconstruction target.
  {
    const claim = 'Per-patch normalised pixels are a better target than raw pixels (Table 1d)';
    const paper = 'linear probe 73.9% against 73.5% (fine-tuning 85.4% against 84.9%)';
    if (missing('abl-r75', 'abl-raw')) out.push({ claim, paper, here: '–', verdict: 'not run yet', why: '' });
    else {
      const o = [order(probe('abl-r75')!, probe('abl-raw')!), order(knn('abl-r75')!, knn('abl-raw')!)];
      const verdict: Verdict = o.every((x) => x === 'higher') ? 'yes' : o.includes('higher') && !o.includes('lower') ? 'partly' : 'no';
      out.push({
        claim,
        paper,
        here: `probe / kNN: norm-pix ${both('abl-r75')}, raw ${both('abl-raw')}`,
        verdict,
        why:
          verdict === 'yes'
            ? ''
            : 'The paper\'s gain is small (0.4 points of linear probe) and the same size as our noise. Normalising a patch boosts its local contrast; most Fashion-MNIST patches are flat background, whose normalised target is zero either way, and the items themselves have little texture for the normalisation to bring out.',
      });
    }
  }

  // Masking strategy.
  {
    const claim = 'Random masking beats block-wise and grid masking (Table 1f)';
    const paper = 'linear probe: random 73.5%, block (75%) 63.9%, grid 66.0%';
    if (missing('abl-r75', 'abl-block', 'abl-grid')) out.push({ claim, paper, here: '–', verdict: 'not run yet', why: '' });
    else {
      const o = [order(probe('abl-r75')!, probe('abl-block')!), order(probe('abl-r75')!, probe('abl-grid')!)];
      const verdict: Verdict = o.every((x) => x === 'higher') ? 'yes' : o.includes('higher') && !o.includes('lower') ? 'partly' : 'no';
      out.push({
        claim,
        paper,
        here: `probe / kNN: random ${both('abl-r75')}, block ${both('abl-block')}, grid ${both('abl-grid')}`,
        verdict,
        why:
          verdict === 'yes'
            ? ''
            : 'On an 8x8 grid of patches, block masking at 75% still leaves whole regions of the item visible and grid masking keeps a visible patch next to every removed one; with items this smooth at 4 pixels, neither makes the task much easier or harder than random masking.',
      });
    }
  }

  // Mask tokens in the encoder.
  {
    const claim = 'An encoder without mask tokens is better and faster (Table 1c, Table 2)';
    const paper = 'linear probe 73.5% without against 59.6% with; 3.3x fewer FLOPs, training 3x or more faster (abstract, Table 2)';
    const skip = runs.get('abl-r75');
    const tokens = runs.get('abl-encoder-mask-token');
    if (!skip?.evaluation || !tokens?.evaluation || !skip.training || !tokens.training) out.push({ claim, paper, here: '–', verdict: 'not run yet', why: '' });
    else {
      const speedup = tokens.training.seconds / skip.training.seconds;
      const better = order(skip.evaluation.probe, tokens.evaluation.probe);
      const verdict: Verdict = better === 'higher' && speedup > 1.5 ? 'yes' : better !== 'lower' && speedup > 1 ? 'partly' : 'no';
      out.push({
        claim,
        paper,
        here: `probe / kNN: without ${both('abl-r75')}, with ${both('abl-encoder-mask-token')}; ${speedup.toFixed(2)}x less wall-clock without`,
        verdict,
        why:
          verdict === 'yes'
            ? ''
            : 'The paper\'s accuracy gap comes from the mismatch between pre-training (mask tokens everywhere) and the unmasked images seen downstream; with 64 patches and two epochs that mismatch costs less. The speed-up at this size is bounded by the decoder, the optimiser and per-step overheads, which do not shrink with the encoder\'s tokens.',
      });
    }
  }
  return out;
}
