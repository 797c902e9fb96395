"""PyTorch eager reference for `npm run bench`: the published MAE (models_mae.py,
timm blocks) and the same workloads as bench/bench.rs, timed the same way.

    python bench/reference.py <tiny|base|fmnist|gemm> <steps> <threads> [modes]

`modes` (default `train,embed,reconstruct`) picks what runs; the others are null.

Prints one JSON line: images/s for a pre-training step (forward, backward, AdamW),
for embedding (encoder over every patch) and for reconstruction (forward with
masking), and the peak RSS of the process.
"""
import json
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

WORKLOADS = {
    # img, patch, chans, dim, depth, heads, dec_dim, dec_depth, dec_heads, batch
    "tiny": (64, 8, 3, 192, 12, 3, 128, 4, 4, 64),
    "base": (224, 16, 3, 768, 12, 12, 512, 8, 16, 8),
    "fmnist": (32, 4, 1, 128, 6, 4, 64, 2, 4, 128),
}


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MAE(nn.Module):
    def __init__(self, img, patch, chans, dim, depth, heads, dec_dim, dec_depth, dec_heads):
        super().__init__()
        self.patch, self.chans = patch, chans
        num_patches = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(chans, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dec_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(dec_dim, dec_heads) for _ in range(dec_depth)])
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, patch * patch * chans)
        for p in self.parameters():
            if p.requires_grad:
                nn.init.normal_(p, std=0.02)

    def patchify(self, imgs):
        p, c = self.patch, self.chans
        n, _, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)

    def forward_encoder(self, x, mask_ratio):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:, :]
        n, l, d = x.shape
        len_keep = int(l * (1 - mask_ratio))
        noise = torch.rand(n, l)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones(n, l)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(n, -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        n = x.shape[0]
        mask_tokens = self.mask_token.repeat(n, ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        target = self.patchify(imgs)
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum(), pred, mask


def rate(fn, steps, batch):
    """Images/s of the median of `steps` timed calls after one warm-up call."""
    fn()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return batch / sorted(seconds)[steps // 2]


def gemm_peak():
    """GFLOP/s of the best of five 1024^3 f32 matmuls (PyTorch's BLAS), as bench.rs."""
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def main():
    name, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    if name == "gemm":
        print(json.dumps({"workload": "gemm", "gflops": gemm_peak()}))
        return
    modes = (sys.argv[4] if len(sys.argv) > 4 else "train,embed,reconstruct").split(",")
    torch.manual_seed(0)
    *arch, batch = WORKLOADS[name]
    model = MAE(*arch)
    imgs = torch.randn(batch, arch[2], arch[0], arch[0])
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.95))

    def train_step():
        loss, _, _ = model(imgs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def embed():
        with torch.no_grad():
            latent, _, _ = model.forward_encoder(imgs, 0.0)
            latent[:, 1:, :].mean(dim=1)

    def reconstruct():
        with torch.no_grad():
            model(imgs)

    result = {
        "workload": name,
        "threads": threads,
        "torch": torch.__version__,
        "train": rate(train_step, steps, batch) if "train" in modes else None,
        "embed": rate(embed, steps, batch) if "embed" in modes else None,
        "reconstruct": rate(reconstruct, steps, batch) if "reconstruct" in modes else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
