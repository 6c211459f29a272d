"""The optimizers of a run and their learning-rate schedule: AdamW, plus Muon for the blocks'
matrices with ``optimizer=muon``; warmup + cosine, constant, or warmup-stable-decay."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from cortexcraft.config import TrainConfig

# Muon's momentum warmup starts here (modded-nanogpt's value).
MUON_MOMENTUM_START = 0.85


def learning_rate(step: int, cfg: TrainConfig, max_steps: int, start: int = 0, time_fraction: float = 0.0) -> float:
    """Linear warmup, then constant, cosine decay, or warmup-stable-decay ("wsd": constant, then
    linear decay over the last ``decay_fraction``) to min_lr (default lr/10) at max_steps.

    A run started from another model's checkpoint at step ``start`` gets a segment of its own:
    warmup from ``start``, decay to min_lr at ``max_steps``; the earlier schedule is not re-stretched.
    ``time_fraction`` is the share of the ``max_minutes`` budget already used: a wsd run is as far
    along as the steps or the clock say, whichever is further, so a budget that stops the run at
    any step still ends it on a finished decay."""
    step, max_steps = step - start, max_steps - start
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, max_steps - cfg.warmup_iters))
    if cfg.lr_schedule == "wsd":
        progress = min(1.0, max(progress, time_fraction))
        remaining = 1.0 - progress
        if remaining >= cfg.decay_fraction:
            return cfg.lr
        return min_lr + (cfg.lr - min_lr) * remaining / cfg.decay_fraction
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def max_steps_for(cfg: TrainConfig, train_tokens: int, tokens_per_step: int) -> int:
    """max_iters, or enough steps to draw ``max_epochs`` times the train split's tokens."""
    if cfg.max_epochs is None:
        return cfg.max_iters
    return max(1, math.ceil(cfg.max_epochs * train_tokens / tokens_per_step))


def orthogonalize(
    updates: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration (torch's, in bf16) on a stack of same-shaped matrices
    at once: a batched product per iteration instead of one per matrix."""
    a, b, c = coefficients
    x = updates.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def muon_lr_ratio(adjust_lr_fn: Optional[str], shape: torch.Size) -> float:
    """torch's Muon learning-rate adjustment for a matrix of ``shape``."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


class BatchedMuon(torch.optim.Muon):
    """torch's Muon, stepping the matrices of one shape together: the blocks hold ``n_layer``
    matrices of each of four shapes, and orthogonalizing each alone spent 18 ms of the cpu
    preset's 117 ms step on 2 CPU cores in many small products.
    Same arithmetic, same state and hyperparameters, so checkpoints of either load in the other.

    With ``normalize`` (NorMuon, arXiv 2510.05491) each output neuron's row of the orthogonalized
    update is divided by that row's running RMS (an EMA with decay ``beta2``, kept per parameter as
    ``neuron_moment``), and the update is then scaled back to its norm before, so Muon's step size
    is unchanged. Orthogonalization evens out the directions of an update but not how much of it
    each neuron gets. On the cpu preset it took the whole-val loss of a 2,400-step run from 1.4727 to
    1.4575 (seed 1337), and of a 5.5-minute run from 1.4685 to 1.4626 (seed 7)."""

    def __init__(self, params, normalize: bool = False, beta2: float = 0.95, **settings: Any):
        super().__init__(params, **settings)
        self.normalize, self.beta2 = normalize, beta2

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            by_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                by_shape.setdefault(param.shape, []).append((param, update))
            for shape, pairs in by_shape.items():
                stacked = torch.stack([update for _, update in pairs])
                ortho = orthogonalize(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"])
                if self.normalize:
                    ortho = self._normalized(ortho, [self.state[param] for param, _ in pairs], group["eps"])
                step_size = lr * muon_lr_ratio(group["adjust_lr_fn"], shape)
                for (param, _), direction in zip(pairs, ortho):
                    param.mul_(1 - lr * group["weight_decay"])
                    param.add_(direction, alpha=-step_size)
        return loss

    def _normalized(self, ortho: torch.Tensor, states: list[dict[str, Any]], eps: float) -> torch.Tensor:
        """NorMuon's step on a stack of orthogonalized updates: rows divided by their running RMS,
        then each update rescaled to its norm before."""
        ortho = ortho.float()
        for state in states:
            state.setdefault("neuron_moment", ortho.new_zeros(ortho.size(-2)))
        moments = torch.stack([state["neuron_moment"] for state in states])
        moments.lerp_(ortho.square().mean(-1), 1 - self.beta2)
        for state, moment in zip(states, moments):
            state["neuron_moment"].copy_(moment)
        normed = ortho / moments.sqrt().clamp(min=eps).unsqueeze(-1)
        scale = ortho.norm(dim=(-2, -1), keepdim=True) / normed.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        return normed * scale


class Optimizers:
    """AdamW, which decays only matrices and embeddings (>= 2-D), never biases or norm gains; with
    ``optimizer=muon``, Muon takes the 2-D matrices inside the blocks and AdamW keeps the
    embeddings, head, gains and biases. Stepped as one, through a GradScaler (a disabled one
    unless training in fp16), so a step is the same code in every precision."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device, scaler: torch.amp.GradScaler):
        self.cfg, self.scaler = cfg, scaler
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        muon_params = [p for name, p in named
                       if cfg.optimizer == "muon" and name.startswith("blocks.") and p.dim() == 2]
        taken = {id(p) for p in muon_params}
        params = [p for _, p in named if id(p) not in taken]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel exists on CPU too: 1.09x (fp32) to 1.17x (bf16) per step at nanoGPT's
        # CPU shape (bench_train).
        self.adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                       fused=device.type in ("cuda", "cpu"))
        self.muon: Optional[BatchedMuon] = None
        if muon_params:
            # weight_decay is always passed: torch's default (0.1) is far from the speedrun's (none).
            self.muon = BatchedMuon(muon_params, normalize=cfg.muon_normalize, beta2=cfg.muon_beta2,
                                    lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum,
                                    nesterov=True, adjust_lr_fn=cfg.muon_adjust_lr)

    def by_name(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers under their checkpoint names ("optimizer" is AdamW, "muon" is Muon)."""
        return {"optimizer": self.adamw, **({"muon": self.muon} if self.muon is not None else {})}

    def schedule(self, step: int, max_steps: int, start: int = 0, time_fraction: float = 0.0) -> float:
        """Set this step's learning rates (Muon's scaled by muon_lr / lr) and Muon momentum; returns
        AdamW's lr. A segment starting at ``start`` has fresh optimizers, so its momentum warms up again."""
        cfg = self.cfg
        lr = learning_rate(step, cfg, max_steps, start, time_fraction)
        for group in self.adamw.param_groups:
            group["lr"] = lr
        if self.muon is not None:
            momentum = cfg.muon_momentum
            if step - start < cfg.muon_momentum_warmup_iters:
                first = min(MUON_MOMENTUM_START, cfg.muon_momentum)
                momentum = first + (cfg.muon_momentum - first) * (step - start) / cfg.muon_momentum_warmup_iters
            for group in self.muon.param_groups:
                group["lr"] = cfg.muon_lr * lr / cfg.lr
                group["momentum"] = momentum
        return lr

    def unscale_gradients(self) -> None:
        """Before clipping: gradients at their true size (a no-op unless the scaler is enabled)."""
        for optimizer in self.by_name().values():
            self.scaler.unscale_(optimizer)

    def step(self) -> None:
        """Step every optimizer (fp16's scaler skips a step with inf gradients), then clear the gradients."""
        for optimizer in self.by_name().values():
            self.scaler.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
        self.scaler.update()

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: optimizer.state_dict() for name, optimizer in self.by_name().items()}

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        for name, optimizer in self.by_name().items():
            optimizer.load_state_dict(states[name])
