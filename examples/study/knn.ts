// k-nearest-neighbour classification on embeddings, in plain TypeScript.
//
// Cosine similarity: every row is scaled to unit length, then a blocked dot product
// (four test rows against one training row at a time, so each training row is read
// once per four test rows) feeds a running top-k per test row. Two votes come from
// the same neighbours:
// - weighted (the DINO / MAE-repository kNN monitor): class score = sum over the k
//   neighbours of exp(similarity / T), T = 0.07;
// - majority: one vote per neighbour, ties to the most similar neighbour's class.

export interface KnnResult {
  /** Accuracy of the temperature-weighted vote. */
  weighted: number;
  /** Accuracy of the plain majority vote. */
  majority: number;
  /** Seconds the search took. */
  seconds: number;
}

export function l2NormaliseRows(x: Float32Array, rows: number, dim: number): Float32Array {
  const out = new Float32Array(rows * dim);
  for (let r = 0; r < rows; r++) {
    let s = 0;
    const o = r * dim;
    for (let d = 0; d < dim; d++) s += x[o + d] * x[o + d];
    const inv = s > 0 ? 1 / Math.sqrt(s) : 0;
    for (let d = 0; d < dim; d++) out[o + d] = x[o + d] * inv;
  }
  return out;
}

function insertTopK(sims: Float32Array, idx: Int32Array, base: number, k: number, s: number, j: number): void {
  // sims[base .. base+k) is sorted in descending order; s beats its last entry.
  let p = base + k - 1;
  while (p > base && sims[p - 1] < s) {
    sims[p] = sims[p - 1];
    idx[p] = idx[p - 1];
    p--;
  }
  sims[p] = s;
  idx[p] = j;
}

export function knnClassify(
  trainFeatures: Float32Array,
  trainLabels: ArrayLike<number>,
  testFeatures: Float32Array,
  testLabels: ArrayLike<number>,
  dim: number,
  options: { k?: number; temperature?: number; numClasses?: number } = {},
): KnnResult {
  const started = performance.now();
  const k = options.k ?? 20;
  const T = options.temperature ?? 0.07;
  const C = options.numClasses ?? 10;
  const nTrain = trainLabels.length;
  const nTest = testLabels.length;
  const a = l2NormaliseRows(trainFeatures, nTrain, dim);
  const b = l2NormaliseRows(testFeatures, nTest, dim);
  const sims = new Float32Array(nTest * k).fill(-Infinity);
  const idx = new Int32Array(nTest * k).fill(-1);
  const kk = Math.min(k, nTrain);
  let rightWeighted = 0;
  let rightMajority = 0;
  const weighted = new Float64Array(C);
  const votes = new Int32Array(C);
  for (let i0 = 0; i0 < nTest; i0 += 4) {
    const rows = Math.min(4, nTest - i0);
    // Missing rows of the last block repeat the first; their results are dropped.
    const o0 = i0 * dim;
    const o1 = (i0 + (rows > 1 ? 1 : 0)) * dim;
    const o2 = (i0 + (rows > 2 ? 2 : 0)) * dim;
    const o3 = (i0 + (rows > 3 ? 3 : 0)) * dim;
    const t0 = i0 * k, t1 = (i0 + 1) * k, t2 = (i0 + 2) * k, t3 = (i0 + 3) * k;
    for (let j = 0; j < nTrain; j++) {
      const oj = j * dim;
      let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (let d = 0; d < dim; d++) {
        const v = a[oj + d];
        s0 += b[o0 + d] * v;
        s1 += b[o1 + d] * v;
        s2 += b[o2 + d] * v;
        s3 += b[o3 + d] * v;
      }
      if (s0 > sims[t0 + kk - 1]) insertTopK(sims, idx, t0, kk, s0, j);
      if (rows > 1 && s1 > sims[t1 + kk - 1]) insertTopK(sims, idx, t1, kk, s1, j);
      if (rows > 2 && s2 > sims[t2 + kk - 1]) insertTopK(sims, idx, t2, kk, s2, j);
      if (rows > 3 && s3 > sims[t3 + kk - 1]) insertTopK(sims, idx, t3, kk, s3, j);
    }
    for (let r = 0; r < rows; r++) {
      const t = (i0 + r) * k;
      weighted.fill(0);
      votes.fill(0);
      for (let n = 0; n < kk; n++) {
        const y = trainLabels[idx[t + n]];
        weighted[y] += Math.exp(sims[t + n] / T);
        votes[y]++;
      }
      let bestW = 0, bestM = trainLabels[idx[t]];
      for (let c = 1; c < C; c++) {
        if (weighted[c] > weighted[bestW]) bestW = c;
        if (votes[c] > votes[bestM]) bestM = c;
      }
      const y = testLabels[i0 + r];
      if (bestW === y) rightWeighted++;
      if (bestM === y) rightMajority++;
    }
  }
  return { weighted: rightWeighted / nTest, majority: rightMajority / nTest, seconds: (performance.now() - started) / 1000 };
}
