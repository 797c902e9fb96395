"""PyTorch eager reference for `npm run bench` and bench/gpu.sh: the published MAE
(models_mae.py, timm blocks) and the same workloads as bench/bench.rs, timed the same way.

    python bench/reference.py [--device cpu|cuda|cuda:N] [--precision f32|bf16] \
        <tiny|base|fmnist|base224|large224|gemm> <steps> [threads] [modes]

`modes` (default `train,embed,reconstruct`) picks what runs; the others are null.
`threads` defaults to the CPU count (`npm run bench` always passes it).
VIT_MAE_BENCH_BATCH overrides the workload's batch. Under Open MPI's mpirun with more than
one process (bench/distributed.mjs), training is data-parallel: DistributedDataParallel on
gloo over loopback, each rank with that batch, and rank 0 prints the images/s of all ranks.

Prints one JSON line: images/s for a pre-training step (forward, backward, AdamW),
for embedding (encoder over every patch) and for reconstruction (forward with
masking), the achieved training TFLOP/s and, on CUDA, MFU (the model's matmul FLOPs,
counted as bench.rs does, training = 3x the masked forward pass, over the H200's
989 TFLOP/s dense bf16 peak), and the peak RSS of the process once the training steps are done.

On CUDA this is plain eager PyTorch as one would write it: the model and the images
on the GPU, `torch.autocast("cuda", dtype=torch.bfloat16)` around the forward pass
for bf16 (parameters, gradients and AdamW state f32), attention through
`F.scaled_dot_product_attention` (on the CPU the explicit softmax form, unchanged),
`torch.optim.AdamW` with its default (foreach, not fused) implementation and
`torch.cuda.synchronize()` at the end of every timed call. No torch.compile,
no CUDA graphs, no fused optimizer. `gemm` on CUDA: best of 10 synchronised timings
of 5 8192^3 products in the given precision, after warm-up; on the CPU, as bench.rs,
a linear layer's three training products at 1024^3 and over each CPU workload's
linear layers.
"""
import json
import os
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
    "fmnist": (32, 4, 1, 128, 6, 4, 64, 2, 4, 256),
    "base224": (224, 16, 3, 768, 12, 12, 512, 8, 16, 256),
    "large224": (224, 16, 3, 1024, 24, 16, 512, 8, 16, 128),
}

# Dense bf16 tensor-core peak of an H200 (= H100 SXM), TFLOP/s: MFU's denominator.
PEAK_TFLOPS = 989.0


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.sdpa = False  # set on CUDA: F.scaled_dot_product_attention (flash / memory-efficient kernels)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.sdpa:
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
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
        noise = torch.rand(n, l, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones(n, l, device=x.device)
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


def forward_flops(img, patch, chans, dim, depth, heads, dec_dim, dec_depth, dec_heads, mask_ratio=0.75):
    """Forward matmul FLOPs per image, as bench.rs: (masked forward pass, encoder over every patch)."""
    block = lambda t, d: 24 * t * d * d + 4 * t * t * d  # noqa: E731
    l = (img // patch) ** 2
    keep = int(l * (1 - mask_ratio))
    pdim = patch * patch * chans
    encoder = lambda t: 2 * l * pdim * dim + depth * block(t, dim)  # noqa: E731
    decoder = 2 * (1 + keep) * dim * dec_dim + dec_depth * block(1 + l, dec_dim) + 2 * (1 + l) * dec_dim * pdim
    return encoder(1 + keep) + decoder, encoder(1 + l)


def rate(fn, steps, batch, warmup=1, sync=lambda: None):
    """Images/s of the median of `steps` timed calls after `warmup` calls; `sync` ends each call."""
    for _ in range(warmup):
        fn()
        sync()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return batch / sorted(seconds)[steps // 2]


CPU_WORKLOADS = ("tiny", "fmnist", "base")


def linear_layers(img, patch, chans, dim, depth, heads, dec_dim, dec_depth, dec_heads, batch, mlp_ratio=4.0):
    """The linear layers of one pre-training step (mask ratio 0.75) as (rows, inputs,
    outputs, how many), as bench.rs lists them."""
    patches, patch_dim = (img // patch) ** 2, patch * patch * chans
    encoder_rows, decoder_rows = batch * (patches // 4 + 1), batch * (patches + 1)

    def block(rows, d, n):
        hidden = int(d * mlp_ratio)
        return [(rows, d, 3 * d, n), (rows, d, d, n), (rows, d, hidden, n), (rows, hidden, d, n)]

    return [(batch * patches, patch_dim, dim, 1), *block(encoder_rows, dim, depth), (encoder_rows, dim, dec_dim, 1),
            *block(decoder_rows, dec_dim, dec_depth), (decoder_rows, dec_dim, patch_dim, 1)]


def linear_layers_gflops(layers):
    """GFLOP/s of PyTorch's BLAS over `layers`: each layer's three training products
    (y = x w^T, dx = y w, dw += y^T x, as nn.Linear's forward and backward run them),
    best of five timings after one warm-up, weighted by how often the step runs them."""
    flops = seconds = 0.0
    for rows, inputs, outputs, count in layers:
        x, w = torch.rand(rows, inputs) - 0.5, torch.rand(outputs, inputs) - 0.5
        y, dx, dw = torch.empty(rows, outputs), torch.empty(rows, inputs), torch.zeros(outputs, inputs)

        def products():
            torch.mm(x, w.t(), out=y)
            torch.mm(y, w, out=dx)
            dw.addmm_(y.t(), x)

        products()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            products()
            best = min(best, time.perf_counter() - start)
        flops += count * 6.0 * rows * inputs * outputs
        seconds += count * best
    return flops / seconds / 1e9


def gemm_cpu():
    """The CPU `gemm` row, as bench.rs: the 1024^3 rate and each CPU workload's."""
    rates = {"1024": linear_layers_gflops([(1024, 1024, 1024, 1)])}
    for name in CPU_WORKLOADS:
        rates[name] = linear_layers_gflops(linear_layers(*WORKLOADS[name]))
    return rates


def gemm_peak_device(device, dtype, n):
    """GFLOP/s of the best of 10 synchronised timings of 5 n^3 products, after 3 warm-up products."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    best, reps = 0.0, 5
    for _ in range(10):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize(device)
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def parse_args(argv):
    """`--device X` / `--precision Y` (or `--flag=value`) anywhere; the rest positional."""
    flags, positional, i = {"device": "cpu", "precision": "f32"}, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            if key not in flags:
                sys.exit(f"unknown flag {arg}: --device <cpu|cuda|cuda:N>, --precision <f32|bf16>")
            if not value:
                i += 1
                value = argv[i]
            flags[key] = value
        else:
            positional.append(arg)
        i += 1
    if flags["precision"] not in ("f32", "bf16"):
        sys.exit(f"unknown precision {flags['precision']}: f32 or bf16")
    return flags["device"], flags["precision"], positional


def main():
    device_name, precision, args = parse_args(sys.argv[1:])
    name, steps = args[0], max(1, int(args[1]))
    threads = int(args[2]) if len(args) > 2 else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if name == "gemm":
        if on_gpu:
            gflops = gemm_peak_device(device, dtype, 8192)
            print(json.dumps({"workload": "gemm", "device": device_name, "precision": precision, "n": 8192, "torch": torch.__version__,
                              "gflops": gflops, "tflops": gflops / 1e3, "fraction_of_peak": gflops / 1e3 / PEAK_TFLOPS}))
        else:
            # On the CPU always the f32 rates of `npm run bench`.
            rates = gemm_cpu()
            print(json.dumps({"workload": "gemm", "device": device_name, "precision": "f32", "n": 1024, "torch": torch.__version__,
                              "gflops": rates["1024"], "rates": rates}))
        return
    modes = (args[3] if len(args) > 3 else "train,embed,reconstruct").split(",")
    torch.manual_seed(0)
    *arch, batch = WORKLOADS[name]
    batch = int(os.environ.get("VIT_MAE_BENCH_BATCH", batch))
    model = MAE(*arch).to(device)
    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    trained = model
    if world > 1:
        import torch.distributed as dist
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("gloo", rank=rank, world_size=world)
        trained = nn.parallel.DistributedDataParallel(model)
    for module in model.modules():
        if isinstance(module, Attention):
            module.sdpa = on_gpu
    imgs = torch.randn(batch, arch[2], arch[0], arch[0], device=device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731
    sync = (lambda: torch.cuda.synchronize(device)) if on_gpu else (lambda: None)
    warmup = 2 if on_gpu else 1
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.95))

    def train_step():
        with autocast():
            loss, _, _ = trained(imgs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def embed():
        with torch.no_grad(), autocast():
            latent, _, _ = model.forward_encoder(imgs, 0.0)
            latent[:, 1:, :].mean(dim=1)

    def reconstruct():
        with torch.no_grad(), autocast():
            model(imgs)

    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    train = rate(train_step, steps, batch, warmup, sync) if "train" in modes else None
    if world > 1:
        train *= world  # every rank trains its own batch in the same time
        if rank != 0:
            return
    # Peak RSS of the training steps, read before the forward-only passes (as bench.rs does).
    train_peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    embed_rate = rate(embed, steps, batch, warmup, sync) if "embed" in modes else None
    reconstruct_rate = rate(reconstruct, steps, batch, warmup, sync) if "reconstruct" in modes else None
    masked, full = forward_flops(*arch)
    train_tflops = train * 3 * masked / 1e12 if train is not None else None
    result = {
        "workload": name,
        "device": device_name,
        "precision": precision,
        "batch": batch,
        "steps": steps,
        "threads": threads,
        "torch": torch.__version__,
        "train": train,
        "embed": embed_rate,
        "reconstruct": reconstruct_rate,
        "train_gflop_per_image": 3 * masked / 1e9,
        "embed_gflop_per_image": full / 1e9,
        "reconstruct_gflop_per_image": masked / 1e9,
        "train_tflops": train_tflops,
        "train_mfu": train_tflops / PEAK_TFLOPS if on_gpu and train_tflops is not None else None,
        "mfu_peak_tflops": PEAK_TFLOPS,
        "peak_rss_mb": train_peak_rss_mb,
        # PyTorch's own allocator counters (not comparable to vit-mae; bench/memwatch.py measures both alike).
        "torch_max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else None,
        "torch_max_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20 if on_gpu else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
