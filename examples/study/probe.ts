// Linear probe on frozen embeddings, in plain TypeScript: features standardised with the
// training set's per-dimension mean and std, then multinomial logistic regression
// (softmax + cross-entropy, weights and bias) trained with Adam (betas 0.9/0.999,
// eps 1e-8, no weight decay) on shuffled mini-batches, at a constant learning rate.

export interface ProbeOptions {
  epochs?: number;
  batchSize?: number;
  lr?: number;
  numClasses?: number;
  seed?: number;
}

export interface ProbeResult {
  /** Test accuracy after the last epoch. */
  accuracy: number;
  /** Training accuracy after the last epoch. */
  trainAccuracy: number;
  /** Seconds the probe took. */
  seconds: number;
  /** The settings it ran with. */
  settings: Required<ProbeOptions>;
}

/** A small deterministic PRNG (mulberry32). */
export function mulberry32(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Per-dimension mean and std of `x` [rows, dim]. */
export function columnStats(x: Float32Array, rows: number, dim: number): { mean: Float64Array; std: Float64Array } {
  const mean = new Float64Array(dim);
  const sq = new Float64Array(dim);
  for (let r = 0; r < rows; r++) for (let d = 0; d < dim; d++) mean[d] += x[r * dim + d];
  for (let d = 0; d < dim; d++) mean[d] /= rows;
  for (let r = 0; r < rows; r++) for (let d = 0; d < dim; d++) { const v = x[r * dim + d] - mean[d]; sq[d] += v * v; }
  const std = sq.map((s) => Math.sqrt(s / rows) || 1);
  return { mean, std };
}

export function standardise(x: Float32Array, rows: number, dim: number, stats: { mean: Float64Array; std: Float64Array }): Float32Array {
  const out = new Float32Array(rows * dim);
  for (let r = 0; r < rows; r++) for (let d = 0; d < dim; d++) out[r * dim + d] = (x[r * dim + d] - stats.mean[d]) / stats.std[d];
  return out;
}

function predictInto(x: Float32Array, row: number, dim: number, w: Float32Array, b: Float32Array, C: number, out: Float64Array): void {
  const o = row * dim;
  for (let c = 0; c < C; c++) {
    let s = b[c];
    const wc = c * dim;
    for (let d = 0; d < dim; d++) s += w[wc + d] * x[o + d];
    out[c] = s;
  }
}

function accuracy(x: Float32Array, y: ArrayLike<number>, dim: number, w: Float32Array, b: Float32Array, C: number): number {
  const logits = new Float64Array(C);
  let right = 0;
  for (let r = 0; r < y.length; r++) {
    predictInto(x, r, dim, w, b, C, logits);
    let best = 0;
    for (let c = 1; c < C; c++) if (logits[c] > logits[best]) best = c;
    if (best === y[r]) right++;
  }
  return right / y.length;
}

/** Trains on standardised `train` features and reports test accuracy. Features are [rows, dim], row-major. */
export function linearProbe(
  trainX: Float32Array,
  trainY: ArrayLike<number>,
  testX: Float32Array,
  testY: ArrayLike<number>,
  dim: number,
  options: ProbeOptions = {},
): ProbeResult {
  const started = performance.now();
  const settings: Required<ProbeOptions> = { epochs: 50, batchSize: 256, lr: 1e-3, numClasses: 10, seed: 0, ...options };
  const { epochs, batchSize, lr, numClasses: C, seed } = settings;
  const n = trainY.length;
  const stats = columnStats(trainX, n, dim);
  const xs = standardise(trainX, n, dim, stats);
  const xt = standardise(testX, testY.length, dim, stats);
  const w = new Float32Array(C * dim);
  const b = new Float32Array(C);
  const gw = new Float32Array(C * dim);
  const gb = new Float32Array(C);
  const mw = new Float32Array(C * dim), vw = new Float32Array(C * dim);
  const mb = new Float32Array(C), vb = new Float32Array(C);
  const rand = mulberry32(seed);
  const order = Int32Array.from({ length: n }, (_, i) => i);
  const logits = new Float64Array(C);
  const beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  let t = 0;
  for (let epoch = 0; epoch < epochs; epoch++) {
    for (let i = n - 1; i > 0; i--) {
      const j = Math.floor(rand() * (i + 1));
      const tmp = order[i]; order[i] = order[j]; order[j] = tmp;
    }
    for (let start = 0; start < n; start += batchSize) {
      const end = Math.min(n, start + batchSize);
      const bs = end - start;
      gw.fill(0);
      gb.fill(0);
      for (let q = start; q < end; q++) {
        const r = order[q];
        predictInto(xs, r, dim, w, b, C, logits);
        let max = -Infinity;
        for (let c = 0; c < C; c++) if (logits[c] > max) max = logits[c];
        let z = 0;
        for (let c = 0; c < C; c++) { logits[c] = Math.exp(logits[c] - max); z += logits[c]; }
        const o = r * dim;
        for (let c = 0; c < C; c++) {
          const g = (logits[c] / z - (trainY[r] === c ? 1 : 0)) / bs;
          gb[c] += g;
          const wc = c * dim;
          for (let d = 0; d < dim; d++) gw[wc + d] += g * xs[o + d];
        }
      }
      t++;
      const c1 = 1 - beta1 ** t, c2 = 1 - beta2 ** t;
      for (let i = 0; i < w.length; i++) {
        mw[i] = beta1 * mw[i] + (1 - beta1) * gw[i];
        vw[i] = beta2 * vw[i] + (1 - beta2) * gw[i] * gw[i];
        w[i] -= (lr * (mw[i] / c1)) / (Math.sqrt(vw[i] / c2) + eps);
      }
      for (let i = 0; i < C; i++) {
        mb[i] = beta1 * mb[i] + (1 - beta1) * gb[i];
        vb[i] = beta2 * vb[i] + (1 - beta2) * gb[i] * gb[i];
        b[i] -= (lr * (mb[i] / c1)) / (Math.sqrt(vb[i] / c2) + eps);
      }
    }
  }
  return {
    accuracy: accuracy(xt, testY, dim, w, b, C),
    trainAccuracy: accuracy(xs, trainY, dim, w, b, C),
    seconds: (performance.now() - started) / 1000,
    settings,
  };
}
