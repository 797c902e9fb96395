//! The transformer blocks and parameter tables the engine's models share: timm's
//! `Block` (pre-norm attention and MLP) written out forward and backward.

use super::cpu::CpuKernels;
use super::{Arena, Epilogue, Kernels, Layout, Slot};

/// A linear layer's parameters (the gradients sit at the same offsets in `Grads`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Linear {
    pub(crate) w: Slot,
    pub(crate) b: Slot,
    pub(crate) k: usize,
    pub(crate) n: usize,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Norm {
    pub(crate) w: Slot,
    pub(crate) b: Slot,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockParams {
    pub(crate) norm1: Norm,
    pub(crate) qkv: Linear,
    pub(crate) proj: Linear,
    pub(crate) norm2: Norm,
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
}

/// One block's activations. `x_in` and `x_out` are the residual stream around it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockActs {
    pub(crate) x_in: Slot,
    pub(crate) ln1: Slot,
    pub(crate) ln1_stats: Slot,
    pub(crate) qkv: Slot,
    pub(crate) probs: Option<Slot>,
    pub(crate) attn: Slot,
    pub(crate) x_mid: Slot,
    pub(crate) ln2: Slot,
    pub(crate) ln2_stats: Slot,
    /// fc1's output before GELU.
    pub(crate) h: Slot,
    pub(crate) gelu: Slot,
    pub(crate) x_out: Slot,
}

/// The backward pass's scratch for one stack of blocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StackScratch {
    /// The residual stream's gradient, updated in place block by block.
    pub(crate) dres: Slot,
    pub(crate) dln: Slot,
    pub(crate) dqkv: Slot,
    pub(crate) dattn: Slot,
    pub(crate) dh: Slot,
}

/// A stack of transformer blocks over `batch` sequences of `tokens`.
pub(crate) struct Stack {
    pub(crate) batch: usize,
    pub(crate) tokens: usize,
    pub(crate) dim: usize,
    pub(crate) heads: usize,
    pub(crate) hidden: usize,
    pub(crate) blocks: Vec<(BlockParams, BlockActs)>,
    /// The first block that trains (keeps its activations and gets gradients); the
    /// blocks before it run forward only. `blocks.len()` when none trains.
    pub(crate) trained_from: usize,
    pub(crate) scratch: Option<StackScratch>,
    pub(crate) drop_path: Option<DropPath>,
}

/// Stochastic depth (timm's `DropPath`): each residual branch scaled per sample.
#[derive(Debug, Clone)]
pub(crate) struct DropPath {
    /// Per block, the `[batch]` scales of its attention and MLP branches.
    pub(crate) scales: Vec<(Slot, Slot)>,
    /// A branch's output before its scale, and the scaled gradient of the stream.
    pub(crate) branch: Slot,
    pub(crate) dbranch: Slot,
}

pub(crate) fn grad(s: Slot) -> Slot {
    Slot { arena: Arena::Grads, ..s }
}

/// The trainable parameters, in the published order, by published name.
pub(crate) struct Params {
    pub(crate) layout: Layout,
    pub(crate) names: Vec<(String, Vec<usize>, Slot)>,
}

impl Params {
    pub(crate) fn take(&mut self, name: &str, shape: &[usize]) -> Slot {
        let slot = self.layout.take(Arena::Params, shape.iter().product());
        self.names.push((name.to_string(), shape.to_vec(), slot));
        slot
    }

    pub(crate) fn linear(&mut self, name: &str, k: usize, n: usize) -> Linear {
        Linear { w: self.take(&format!("{name}.weight"), &[n, k]), b: self.take(&format!("{name}.bias"), &[n]), k, n }
    }

    pub(crate) fn norm(&mut self, name: &str, d: usize) -> Norm {
        Norm { w: self.take(&format!("{name}.weight"), &[d]), b: self.take(&format!("{name}.bias"), &[d]) }
    }

    pub(crate) fn block(&mut self, name: &str, d: usize, hidden: usize) -> BlockParams {
        BlockParams {
            norm1: self.norm(&format!("{name}.norm1"), d),
            qkv: self.linear(&format!("{name}.attn.qkv"), d, 3 * d),
            proj: self.linear(&format!("{name}.attn.proj"), d, d),
            norm2: self.norm(&format!("{name}.norm2"), d),
            fc1: self.linear(&format!("{name}.mlp.fc1"), d, hidden),
            fc2: self.linear(&format!("{name}.mlp.fc2"), hidden, d),
        }
    }
}

/// The blocks' activations. Blocks from `trained_from` on keep their own (training);
/// the blocks before share one set, the residual stream alternating between two
/// buffers, and keep nothing for a backward pass. With `drop_path`, room for the
/// per-sample branch scales.
#[allow(clippy::too_many_arguments)]
pub(crate) fn stack_acts(acts: &mut Layout, trained_from: usize, drop_path: bool, params: Vec<BlockParams>, batch: usize, tokens: usize, dim: usize, heads: usize, hidden: usize) -> Stack {
    let rows = batch * tokens;
    let depth = params.len();
    let trained_from = trained_from.min(depth);
    let mut take = |len: usize| acts.take(Arena::Acts, len);
    let mut shared: Option<BlockActs> = None;
    let first_in = take(rows * dim);
    let other = (trained_from > 0).then(|| take(rows * dim));
    let mut x_in = first_in;
    let mut blocks = Vec::with_capacity(depth);
    for (i, p) in params.into_iter().enumerate() {
        let train = i >= trained_from;
        let fresh = |take: &mut dyn FnMut(usize) -> Slot, x_in: Slot, x_out: Slot| BlockActs {
            x_in,
            ln1: take(rows * dim),
            ln1_stats: take(2 * rows),
            qkv: take(rows * 3 * dim),
            probs: train.then(|| take(batch * heads * tokens * tokens)),
            attn: take(rows * dim),
            x_mid: take(rows * dim),
            ln2: take(rows * dim),
            ln2_stats: take(2 * rows),
            h: take(rows * hidden),
            gelu: take(rows * hidden),
            x_out,
        };
        let a = if train {
            let x_out = take(rows * dim);
            fresh(&mut take, x_in, x_out)
        } else {
            let x_out = if i % 2 == 0 { other.expect("a forward-only prefix alternates") } else { first_in };
            match shared {
                Some(s) => BlockActs { x_in, x_out, ..s },
                None => {
                    let a = fresh(&mut take, x_in, x_out);
                    shared = Some(a);
                    a
                }
            }
        };
        x_in = a.x_out;
        blocks.push((p, a));
    }
    let scratch = (trained_from < depth).then(|| StackScratch { dres: take(rows * dim), dln: take(rows * dim), dqkv: take(rows * 3 * dim), dattn: take(rows * dim), dh: take(rows * hidden) });
    let drop_path = drop_path.then(|| DropPath {
        scales: (0..depth).map(|_| (take(batch), take(batch))).collect(),
        branch: take(rows * dim),
        dbranch: take(rows * dim),
    });
    Stack { batch, tokens, dim, heads, hidden, blocks, trained_from, scratch, drop_path }
}

impl Stack {
    pub(crate) fn rows(&self) -> usize {
        self.batch * self.tokens
    }

    /// The stream's input (the first block's `x_in`).
    pub(crate) fn input(&self) -> Slot {
        self.blocks[0].1.x_in
    }

    pub(crate) fn output(&self) -> Slot {
        self.blocks.last().expect("at least one block").1.x_out
    }

    pub(crate) fn forward<K: Kernels>(&self, k: &mut K, eps: f32) {
        self.forward_observed(k, eps, |_, _, _| ());
    }

    /// The forward pass, handing `observe` each block's index and output slot as soon as
    /// it is computed (a forward-only prefix reuses its buffers block after block).
    pub(crate) fn forward_observed<K: Kernels>(&self, k: &mut K, eps: f32, mut observe: impl FnMut(&K, usize, Slot)) {
        let (rows, d, t) = (self.rows(), self.dim, self.tokens);
        for (i, (p, a)) in self.blocks.iter().enumerate() {
            let drop = self.drop_path.as_ref().map(|dp| (dp.scales[i], dp.branch));
            k.layer_norm(a.x_in, p.norm1.w, p.norm1.b, a.ln1, a.ln1_stats, rows, d, eps);
            k.linear(a.ln1, p.qkv.w, p.qkv.b, None, a.qkv, rows, d, 3 * d, Epilogue::None);
            k.attention(a.qkv, a.attn, a.probs, self.batch, self.tokens, d, self.heads);
            match drop {
                // x_mid = x_in + proj(attn): the residual added in the product's own pass.
                None => k.linear(a.attn, p.proj.w, p.proj.b, Some(a.x_in), a.x_mid, rows, d, d, Epilogue::None),
                Some(((attn_scale, _), branch)) => {
                    k.linear(a.attn, p.proj.w, p.proj.b, None, branch, rows, d, d, Epilogue::None);
                    k.scaled_add(Some(a.x_in), branch, attn_scale, a.x_mid, t, d);
                }
            }
            k.layer_norm(a.x_mid, p.norm2.w, p.norm2.b, a.ln2, a.ln2_stats, rows, d, eps);
            k.linear(a.ln2, p.fc1.w, p.fc1.b, None, a.h, rows, d, self.hidden, Epilogue::Gelu { y: a.gelu });
            match drop {
                None => k.linear(a.gelu, p.fc2.w, p.fc2.b, Some(a.x_mid), a.x_out, rows, self.hidden, d, Epilogue::None),
                Some(((_, mlp_scale), branch)) => {
                    k.linear(a.gelu, p.fc2.w, p.fc2.b, None, branch, rows, self.hidden, d, Epilogue::None);
                    k.scaled_add(Some(a.x_mid), branch, mlp_scale, a.x_out, t, d);
                }
            }
            observe(k, i, a.x_out);
        }
    }

    /// Backpropagates the gradient in `scratch.dres` (of the stack's output) to the input
    /// of the first trained block, in place, adding the trained blocks' gradients.
    pub(crate) fn backward(&self, k: &mut impl Kernels) {
        let s = self.scratch.expect("a stack with trained blocks");
        let (rows, d, f, t) = (self.rows(), self.dim, self.hidden, self.tokens);
        for (i, (p, a)) in self.blocks.iter().enumerate().rev().take(self.blocks.len() - self.trained_from) {
            // Under drop path a branch's output gradient is dres times its scale.
            let dmlp = match &self.drop_path {
                Some(dp) => {
                    k.scaled_add(None, s.dres, dp.scales[i].1, dp.dbranch, t, d);
                    dp.dbranch
                }
                None => s.dres,
            };
            // MLP branch: dres is d x_out = d x_mid (identity path) + the branch's share.
            k.linear_backward(dmlp, a.gelu, p.fc2.w, Some(s.dh), false, Some((grad(p.fc2.w), grad(p.fc2.b))), rows, f, d);
            k.gelu_backward(a.h, s.dh);
            k.linear_backward(s.dh, a.ln2, p.fc1.w, Some(s.dln), false, Some((grad(p.fc1.w), grad(p.fc1.b))), rows, d, f);
            k.layer_norm_backward(s.dln, a.x_mid, p.norm2.w, a.ln2_stats, s.dres, grad(p.norm2.w), grad(p.norm2.b), rows, d);
            // Attention branch.
            let dattn_out = match &self.drop_path {
                Some(dp) => {
                    k.scaled_add(None, s.dres, dp.scales[i].0, dp.dbranch, t, d);
                    dp.dbranch
                }
                None => s.dres,
            };
            k.linear_backward(dattn_out, a.attn, p.proj.w, Some(s.dattn), false, Some((grad(p.proj.w), grad(p.proj.b))), rows, d, d);
            k.attention_backward(s.dattn, a.qkv, a.probs.expect("a trained block"), s.dqkv, self.batch, self.tokens, d, self.heads);
            k.linear_backward(s.dqkv, a.ln1, p.qkv.w, Some(s.dln), false, Some((grad(p.qkv.w), grad(p.qkv.b))), rows, d, 3 * d);
            k.layer_norm_backward(s.dln, a.x_in, p.norm1.w, a.ln1_stats, s.dres, grad(p.norm1.w), grad(p.norm1.b), rows, d);
        }
    }
}

/// An observer for [`Stack::forward_observed`] that downloads the output of each block
/// of `layers` into the matching entry of `outputs` (a block may be asked for twice).
pub(crate) fn keep_outputs<'a>(layers: &'a [usize], outputs: &'a mut [Vec<f32>]) -> impl FnMut(&CpuKernels, usize, Slot) + 'a {
    move |k, block, x_out| {
        for (out, _) in outputs.iter_mut().zip(layers).filter(|(_, &layer)| layer == block) {
            *out = k.download(x_out);
        }
    }
}
