"""Several linear heads (or one-hidden-layer MLPs) trained together as one wide module: the linear head's sweep.

The m configurations of a sweep (learning rate x weight decay) see the same rows in the same order, from the same
initial weights; they differ only in their optimiser's settings. Stacked, their first layers are one (m * width, d)
matrix, so one matrix product of the batch serves every configuration, and a streamed split is read once per epoch
instead of m times. AdamW and the cosine schedule are torch's, step for step, with a learning rate and a weight
decay per configuration; early stopping is per configuration (one that stops is frozen: its best epoch's weights
are kept, its moments no longer move), so each configuration ends where it would have ended trained alone.
"""

from __future__ import annotations

import math

import numpy as np

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults
MIN_IMPROVEMENT = 1e-5  # of the held-out loss, for a better epoch (as block5.run_epochs)


class WideModel:
    """m copies of `template` (a torch nn.Linear, or Linear-ReLU-Dropout-Linear) as stacked parameters."""

    def __init__(self, template, m: int, dropout: float):
        import torch

        linears = [layer for layer in template.modules() if isinstance(layer, torch.nn.Linear)]
        self.params = [p.detach().unsqueeze(0).repeat(m, *([1] * p.dim())).requires_grad_(True)
                       for layer in linears for p in (layer.weight, layer.bias)]
        self.m, self.dropout = m, dropout

    def __call__(self, x, training: bool):
        """Inputs (n, d) -> logits (n, m, k)."""
        import torch.nn.functional as F

        W, b = self.params[0], self.params[1]  # (m, h, d), (m, h)
        m, h, d = W.shape
        out = (x @ W.reshape(m * h, d).T + b.reshape(-1)).reshape(len(x), m, h)
        for W, b in zip(self.params[2::2], self.params[3::2]):  # a hidden layer: per configuration
            out = F.dropout(F.relu(out), self.dropout, training)
            out = (out.transpose(0, 1) @ W.transpose(1, 2)).transpose(0, 1) + b
        return out

    def losses(self, x, y, training: bool):
        """Mean cross-entropy of each configuration, (m,)."""
        import torch

        logp = torch.log_softmax(self(x, training).float(), dim=2)
        return -logp.gather(2, y[:, None, None].expand(-1, self.m, 1)).squeeze(2).mean(0)

    def state(self, j: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Configuration j's layers as (weight, bias) float64 arrays."""
        arrays = [p[j].detach().cpu().double().numpy() for p in self.params]
        return list(zip(arrays[0::2], arrays[1::2]))


class WideAdamW:
    """torch.optim.AdamW (step for step) over the stacked parameters, a learning rate and a weight decay per
    configuration, cosine-annealed to 0 over `total` steps; `frozen` configurations do not move."""

    def __init__(self, params, lr: np.ndarray, weight_decay: np.ndarray, total: int):
        import torch

        device = params[0].device
        self.params, self.total, self.steps = params, total, 0
        self.lr, self.wd = (torch.tensor(v, dtype=torch.float32, device=device) for v in (lr, weight_decay))
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        self.frozen = torch.zeros(len(lr), dtype=torch.bool, device=device)

    def step(self) -> None:
        import torch

        # the schedule's factor at this step (torch's CosineAnnealingLR, eta_min 0, stepped after each step)
        factor = 0.5 * (1 + math.cos(math.pi * self.steps / self.total)) if self.total else 1.0
        self.steps += 1
        lr = torch.where(self.frozen, torch.zeros_like(self.lr), self.lr * factor)
        c1, c2 = 1 - BETAS[0] ** self.steps, math.sqrt(1 - BETAS[1] ** self.steps)
        with torch.no_grad():
            for p, (m1, m2) in zip(self.params, self.moments):
                shape = (-1,) + (1,) * (p.dim() - 1)
                live = (~self.frozen).view(shape)
                p.mul_(1 - (lr * self.wd).view(shape))
                m1.copy_(torch.where(live, m1.lerp(p.grad, 1 - BETAS[0]), m1))
                m2.copy_(torch.where(live, m2 * BETAS[1] + (1 - BETAS[1]) * p.grad * p.grad, m2))
                p.sub_((lr / c1).view(shape) * m1 / (m2.sqrt() / c2 + EPS))
                p.grad = None


def train(model: WideModel, opt: WideAdamW, batches, held_out, epochs: int, patience: int | None):
    """Epochs over `batches()`; per configuration, the weights of its epoch with the lowest held-out loss, and
    stopping after `patience` epochs without a better one. Returns (layers, epochs run, best epoch, its held-out
    loss) per configuration."""
    import torch

    m = model.m
    ran, best_epoch = np.full(m, epochs), np.zeros(m, int)
    best_loss = np.full(m, np.inf)
    best = [model.state(j) for j in range(m)]  # epoch 0: the initial weights, until an epoch does better
    for epoch in range(1, epochs + 1):
        for xb, yb in batches():
            model.losses(xb, yb, training=True).sum().backward()
            opt.step()
        if held_out is None:
            continue
        with torch.no_grad():
            losses = model.losses(*held_out, training=False).cpu().numpy()
        live = ~opt.frozen.cpu().numpy()
        better = live & (losses < best_loss - MIN_IMPROVEMENT)
        for j in np.flatnonzero(better):
            best[j], best_loss[j], best_epoch[j] = model.state(j), losses[j], epoch
        stop = live & ~better & (epoch - best_epoch >= patience)
        ran[stop] = epoch
        opt.frozen |= torch.as_tensor(stop, device=opt.frozen.device)
        if bool(opt.frozen.all()):
            break
    if held_out is None:
        return [(model.state(j), epochs, epochs, float("nan")) for j in range(m)]
    return [(best[j], int(ran[j]), int(best_epoch[j]), float(best_loss[j])) for j in range(m)]
