//! Which patches the encoder sees. Masks are built on the host from a seeded RNG
//! (candle's CPU RNG cannot be seeded) and handed to the model as index lists.

use crate::bail;
use crate::error::Result;
use rand::Rng;

/// The masking strategies the paper compares (Table 1f).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Masking {
    /// Uniformly random patches: argsort of per-sample noise (the published method).
    Random,
    /// BEiT-style blocks of random size and aspect ratio.
    Block,
    /// Keep one patch of every 2x2 (fixed ratio 0.75).
    Grid,
}

impl Masking {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "random" => Ok(Masking::Random),
            "block" => Ok(Masking::Block),
            "grid" => Ok(Masking::Grid),
            _ => bail!(InvalidArgument, "unknown masking '{s}': expected 'random', 'block' or 'grid'"),
        }
    }
}

/// Per sample, the order in which patches are shuffled: the first `len_keep`
/// are visible, the rest removed.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskPlan {
    /// `[N][L]`: a permutation of `0..L` per sample, visible patches first.
    pub ids_shuffle: Vec<Vec<u32>>,
    pub len_keep: usize,
}

impl MaskPlan {
    /// Every patch visible, in order: the encoder over whole images.
    pub fn keep_all(n: usize, l: usize) -> Self {
        MaskPlan { ids_shuffle: vec![(0..l as u32).collect(); n], len_keep: l }
    }

    /// `ids_restore[n][l]` is where patch `l` sits in the shuffled order.
    pub fn ids_restore(&self) -> Vec<Vec<u32>> {
        self.ids_shuffle
            .iter()
            .map(|shuffle| {
                let mut restore = vec![0u32; shuffle.len()];
                for (position, &patch) in shuffle.iter().enumerate() {
                    restore[patch as usize] = position as u32;
                }
                restore
            })
            .collect()
    }

    /// `[N][L]`, 1 where a patch is removed, in the patches' own order.
    pub fn mask(&self) -> Vec<Vec<f32>> {
        self.ids_restore()
            .iter()
            .map(|restore| restore.iter().map(|&pos| if (pos as usize) < self.len_keep { 0.0 } else { 1.0 }).collect())
            .collect()
    }
}

/// The number of visible patches for a ratio, as the published `int(L * (1 - mask_ratio))`.
pub fn len_keep(num_patches: usize, mask_ratio: f64) -> usize {
    (num_patches as f64 * (1.0 - mask_ratio)) as usize
}

pub fn check_mask_ratio(mask_ratio: f64) -> Result<()> {
    if !(0.0..1.0).contains(&mask_ratio) {
        bail!(InvalidMaskRatio, "maskRatio must be in [0, 1), got {mask_ratio}");
    }
    Ok(())
}

/// Random masking from given noise `[N][L]`: keep the patches with the smallest noise.
pub fn random_from_noise(noise: &[Vec<f32>], mask_ratio: f64) -> Result<MaskPlan> {
    check_mask_ratio(mask_ratio)?;
    let num_patches = noise.first().map_or(0, Vec::len);
    if noise.iter().any(|row| row.len() != num_patches) {
        bail!(InvalidNoise, "noise rows must all have the same length");
    }
    if noise.iter().flatten().any(|v| !v.is_finite()) {
        bail!(InvalidNoise, "noise must be finite");
    }
    let ids_shuffle = noise.iter().map(|row| order_by_noise(row)).collect();
    Ok(MaskPlan { ids_shuffle, len_keep: len_keep(num_patches, mask_ratio) })
}

/// The published `argsort` of one sample's noise: patches by increasing noise.
fn order_by_noise(row: &[f32]) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    ids.sort_by(|&a, &b| row[a as usize].total_cmp(&row[b as usize]));
    ids
}

/// Uniform noise in [0, 1) for `random_from_noise`, as the published `torch.rand`.
pub fn uniform_noise(rng: &mut impl Rng, batch: usize, num_patches: usize) -> Vec<Vec<f32>> {
    (0..batch).map(|_| noise_row(rng, num_patches)).collect()
}

fn noise_row(rng: &mut impl Rng, num_patches: usize) -> Vec<f32> {
    (0..num_patches).map(|_| rng.random::<f32>()).collect()
}

/// How every sample of a batch is masked, checked once: the strategy, the grid of
/// patches and how many of them stay visible. Each sample's mask is drawn on its own
/// ([`MaskSampler::sample_order`]), from one generator for the whole batch or from a
/// generator per sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskSampler {
    masking: Masking,
    grid_size: usize,
    len_keep: usize,
}

impl MaskSampler {
    /// Refuses a ratio outside [0, 1) (`InvalidMaskRatio`); grid masking keeps one patch
    /// of every 2x2, so it also needs a ratio of 0.75 and an even grid (`InvalidArgument`).
    pub fn new(masking: Masking, grid_size: usize, mask_ratio: f64) -> Result<Self> {
        check_mask_ratio(mask_ratio)?;
        let num_patches = grid_size * grid_size;
        if masking == Masking::Grid {
            if !((mask_ratio - 0.75).abs() <= 1e-9) {
                bail!(InvalidMaskRatio, "grid masking keeps one patch of every 2x2, so maskRatio must be 0.75, got {mask_ratio}");
            }
            if grid_size % 2 != 0 {
                bail!(InvalidArgument, "grid masking needs an even number of patches per side, got {grid_size}");
            }
        }
        let len_keep = if masking == Masking::Grid { num_patches / 4 } else { len_keep(num_patches, mask_ratio) };
        Ok(MaskSampler { masking, grid_size, len_keep })
    }

    /// Visible patches per sample.
    pub fn len_keep(&self) -> usize {
        self.len_keep
    }

    /// One sample's patch order, visible patches first, drawn from `rng`: the published
    /// argsort of `L` uniform draws (random), BEiT's blocks (block), or, without a draw,
    /// the top-left patch of every 2x2 cell (grid).
    pub fn sample_order(&self, rng: &mut impl Rng) -> Vec<u32> {
        let (g, num_patches) = (self.grid_size, self.grid_size * self.grid_size);
        match self.masking {
            Masking::Random => order_by_noise(&noise_row(rng, num_patches)),
            Masking::Block => {
                // BEiT uses 16-patch blocks on its 14x14 grid; scale that to the grid at hand.
                let min_block = ((16 * num_patches) as f64 / 196.0).round().max(1.0) as usize;
                let mask = block_mask(rng, g, num_patches - self.len_keep, min_block);
                visible_first(num_patches, |l| !mask[l])
            }
            Masking::Grid => visible_first(num_patches, |l| (l / g) % 2 == 0 && (l % g) % 2 == 0),
        }
    }

    /// The masks of `n` samples drawn one after the other from `rng`, as `torch.rand(N, L)`
    /// draws its rows.
    pub fn batch(&self, rng: &mut impl Rng, n: usize) -> MaskPlan {
        MaskPlan { ids_shuffle: (0..n).map(|_| self.sample_order(rng)).collect(), len_keep: self.len_keep }
    }

    /// One mask per generator, each sample's drawn from its own, so that it does not
    /// depend on the other samples of the batch or on its place among them.
    pub fn per_sample<R: Rng>(&self, rngs: impl IntoIterator<Item = R>) -> MaskPlan {
        MaskPlan { ids_shuffle: rngs.into_iter().map(|mut rng| self.sample_order(&mut rng)).collect(), len_keep: self.len_keep }
    }
}

/// The patches `0..num_patches` in the order of a plan: the visible ones first.
fn visible_first(num_patches: usize, visible: impl Fn(usize) -> bool) -> Vec<u32> {
    let (kept, removed): (Vec<u32>, Vec<u32>) = (0..num_patches as u32).partition(|&l| visible(l as usize));
    kept.into_iter().chain(removed).collect()
}

/// BEiT's block-wise masking generator (blocks of at least `min_block` patches,
/// aspect ratio in [0.3, 1/0.3]), run until exactly `to_mask` patches are removed: when
/// no block of the minimum size fits the remainder any more, smaller blocks fill it, so
/// every sample has the same number of visible patches.
fn block_mask(rng: &mut impl Rng, grid_size: usize, to_mask: usize, min_block: usize) -> Vec<bool> {
    let mut mask = vec![false; grid_size * grid_size];
    let mut count = 0;
    let mut min_block = min_block;
    while count < to_mask {
        let delta = place_block(rng, &mut mask, grid_size, min_block.min(to_mask - count), to_mask - count);
        if delta == 0 {
            if min_block == 1 {
                // Ten tries missed every free cell: take the first free one.
                let free = mask.iter().position(|m| !m).expect("fewer patches masked than exist");
                mask[free] = true;
                count += 1;
            }
            min_block = (min_block / 2).max(1);
        }
        count += delta;
    }
    mask
}

/// One try of BEiT's `_mask`: up to ten random blocks; the first one that adds
/// between 1 and `max_new` new patches is applied. Returns how many it added.
fn place_block(rng: &mut impl Rng, mask: &mut [bool], grid_size: usize, min_block: usize, max_new: usize) -> usize {
    let log_aspect = (0.3f64.ln(), (1.0f64 / 0.3).ln());
    for _ in 0..10 {
        let target_area = rng.random_range(min_block as f64..=max_new.max(min_block) as f64);
        let aspect = rng.random_range(log_aspect.0..log_aspect.1).exp();
        let h = (target_area * aspect).sqrt().round() as usize;
        let w = (target_area / aspect).sqrt().round() as usize;
        if h == 0 || w == 0 || h > grid_size || w > grid_size {
            continue;
        }
        let top = rng.random_range(0..=grid_size - h);
        let left = rng.random_range(0..=grid_size - w);
        let cells = || (top..top + h).flat_map(move |r| (left..left + w).map(move |c| r * grid_size + c));
        let new = cells().filter(|&i| !mask[i]).count();
        if new > 0 && new <= max_new {
            cells().for_each(|i| mask[i] = true);
            return new;
        }
    }
    0
}
