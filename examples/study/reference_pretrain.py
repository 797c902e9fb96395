"""The study's wall-clock reference: issue 7's pre-training recipe in PyTorch eager on
this machine, so that `mae-r75`'s time is compared side by side on the same hardware.

    python examples/study/reference_pretrain.py <train-images-idx3-ubyte.gz> <epochs> <threads> [batch] [max_steps]

The model is bench/reference.py's `MAE` (models_mae.py's structure with timm-style
blocks) as `mae_vit_fmnist_patch4_32` with the norm-pix loss. Its position embeddings
stay at zero and its weights at PyTorch's default initialisation: neither changes the
work of a step, so the run times the recipe, and its loss is not comparable. The data as the study feeds it
(28x28 zero-padded to 32x32, normalised with the training set's mean and std, random
horizontal flips, reshuffled every epoch, last partial batch dropped); AdamW lr 1.5e-3
at batch 256, betas (0.9, 0.95), weight decay 0.05 except on biases and norms (as
main_pretrain.py), per-step linear warm-up over the first epoch then half-cycle cosine
to 0. Prints one JSON line: training seconds (the loop only, data slicing and flips
included), images/s, steps and the last loss.
"""
import gzip
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
from reference import MAE  # noqa: E402


def read_idx_images(path):
    with gzip.open(path) as f:
        data = f.read()
    n, rows, cols = (int(v) for v in np.frombuffer(data[4:16], dtype=">i4"))
    return np.frombuffer(data[16:], dtype=np.uint8).reshape(n, 1, rows, cols)


def norm_pix_loss(model, imgs, pred, mask):
    target = model.patchify(imgs)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def main():
    path, epochs, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 256
    max_steps = int(sys.argv[5]) if len(sys.argv) > 5 else None
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    raw = torch.from_numpy(read_idx_images(path).astype(np.float32) / 255)
    mean, std = raw.mean().item(), raw.std(unbiased=False).item()
    imgs = (F.pad(raw, (2, 2, 2, 2)) - mean) / std

    model = MAE(32, 4, 1, 128, 6, 4, 64, 2, 4)
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim == 1 or n.endswith(".bias"))]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim == 1 or n.endswith(".bias"))]
    lr = 1.5e-3 * batch / 256
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))

    steps_per_epoch = len(imgs) // batch
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    warmup = 1.0
    step, loss_value = 0, float("nan")
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(imgs))
        for i in range(steps_per_epoch):
            if step == total:
                break
            x = imgs[order[i * batch:(i + 1) * batch]]
            flip = torch.rand(x.shape[0], 1, 1, 1) < 0.5
            x = torch.where(flip, x.flip(-1), x)
            e = epoch + i / steps_per_epoch
            step_lr = lr * e / warmup if e < warmup else lr * 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            latent, mask, ids_restore = model.forward_encoder(x, 0.75)
            loss = norm_pix_loss(model, x, model.forward_decoder(latent, ids_restore), mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = loss.item()
            step += 1
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "imagesPerSec": step * batch / seconds, "steps": step, "batchSize": batch, "finalLoss": loss_value, "threads": threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
