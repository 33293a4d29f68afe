"""The one policy for updates that go wrong, for every backend: non-finite losses and gradients,
fp16 overflow streaks, and finite blow-ups (``train.max_grad_norm``, ``max_loss``, ``max_abs_weight``).

``record`` takes what one update did (:class:`gan.backends.Update`) and decides at once what is
already known on the host; counts still on the device (DDP with fused Adam) wait for ``check``, a
collective run by every rank once per log interval and before every checkpoint, which reads them with
one all-reduce and one host sync, so every rank decides alike and no checkpoint holds bad weights.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from gan.dist import all_reduce_


class NonFiniteError(RuntimeError):
    """Training hit a non-finite loss, gradient or weight and the policy says stop."""


class DivergenceError(NonFiniteError):
    """A finite blow-up: a loss, gradient norm or weight above its limit (train.max_loss,
    train.max_grad_norm, train.max_abs_weight)."""


ADVICE = "Stopped; the last good checkpoint is kept. Lower the learning rates (optim.lr_d, optim.lr_g)"


def largest_abs(module: torch.nn.Module) -> torch.Tensor:
    """The largest |weight| of a net; inf if a weight or a floating buffer (BatchNorm's running
    statistics, which a checkpoint keeps too) is not finite, so such a net is never checkpointed."""
    largest = torch.nn.utils.get_total_norm([p.detach() for p in module.parameters()], norm_type=math.inf)
    buffers = [b.detach() for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return largest
    finite = torch.stack([torch.isfinite(b).all() for b in buffers]).all()
    return torch.where(finite, largest, torch.full_like(largest, math.inf))


class Guard:
    """Skip or stop (``train.on_nonfinite``, up to ``train.max_skipped``), counted in ``state``."""

    def __init__(self, t, state, stats, rank0, device: torch.device):
        self.t, self.state, self.stats, self.rank0, self.device = t, state, stats, rank0, device
        self._nonfinite: dict[str, torch.Tensor | int] = {}  # phase -> non-finite updates since the last check
        self._too_large: dict[str, torch.Tensor | int] = {}  # phase -> updates skipped for train.max_grad_norm
        self._peak_loss: dict[str, torch.Tensor] = {}  # phase -> largest finite |loss| since the last check
        self._fp16_streak = 0
        self.since = 0  # the step of the last check

    def record(self, phase: str, loss: torch.Tensor, u, nets: dict) -> None:
        """After one update of ``phase`` (D, D_reg, G). Skipped updates were not applied."""
        t, step = self.t, self.state.step
        # The loss differs between ranks (each has its own batch): only recorded; the ranks agree in check().
        loss_abs = loss.detach().float().abs()
        peak = torch.where(torch.isfinite(loss_abs), loss_abs, 0.0)
        self._peak_loss[phase] = torch.maximum(self._peak_loss[phase], peak) if phase in self._peak_loss else peak
        if u.diverged:  # above train.max_grad_norm and not skippable (fp16 scaler, DeepSpeed): gnorm agrees on all ranks
            raise DivergenceError(f"gradient norm {float(u.gnorm):.4g} in {phase} at step {step} is above "
                                  f"train.max_grad_norm={t.max_grad_norm:g}; the training is diverging. {ADVICE}")
        if u.fp16_skipped is not None:
            self.stats.report("Mixed/fp16_skipped", float(u.fp16_skipped))
            self.state.fp16_skipped += int(u.fp16_skipped)
            self._fp16_streak = self._fp16_streak + 1 if u.fp16_skipped else 0
            if self._fp16_streak > t.max_skipped:
                raise NonFiniteError(f"{self._fp16_streak} fp16 steps in a row overflowed in {phase}; "
                                     f"the loss is diverging. Lower the learning rates or use bf16")
        for counts, n in ((self._nonfinite, u.nonfinite), (self._too_large, u.too_large)):
            if torch.is_tensor(n) or n:
                counts[phase] = counts.get(phase, 0) + n
        if not torch.is_tensor(u.nonfinite) and (u.nonfinite or u.too_large):  # known on the host: decide now
            self.check(nets, f"loss {loss.item():.4g}, grad norm {float(u.gnorm):.4g}", last=step)

    def check(self, nets: dict, detail: str = "", last: int | None = None) -> None:
        """Every rank, a collective. Skipped updates (non-finite gradient, or gradient norm above
        ``train.max_grad_norm``) were never applied: skip or stop by ``train.on_nonfinite``. A loss above
        ``train.max_loss`` or a weight above ``train.max_abs_weight`` (or a non-finite one) was already
        trained on: that always stops."""
        t, step = self.t, self.state.step
        phases = {"non-finite": dict(self._nonfinite), "large": dict(self._too_large)}
        peaks = dict(self._peak_loss)
        self._nonfinite.clear()
        self._too_large.clear()
        self._peak_loss.clear()
        since, self.since = self.since, step
        values = [torch.as_tensor(v, dtype=torch.float32, device=self.device)
                  for kind in phases.values() for v in kind.values()] + \
                 [v.float() for v in peaks.values()] + [largest_abs(m).float().to(self.device) for m in nets.values()]
        packed = torch.stack(values)
        packed = torch.where(torch.isnan(packed), torch.full_like(packed, math.inf), packed)  # MAX keeps inf, not NaN
        values = iter(all_reduce_(packed, dist.ReduceOp.MAX).tolist())  # the one sync
        counts = {kind: {k: int(next(values)) for k in c} for kind, c in phases.items()}
        peaks = {k: next(values) for k in peaks}
        weights = dict(zip(nets, values))
        last = step - 1 if last is None else last  # steps are numbered by G steps done before them
        where = f"step {last}" if last <= since else f"steps {since}-{last}"

        n = sum(v for c in counts.values() for v in c.values())
        if n:
            self.state.skipped_nonfinite += n
            parts = []
            for kind, c in counts.items():
                c = {k: v for k, v in c.items() if v}
                if c:
                    what = ("non-finite loss/gradient" if kind == "non-finite" else
                            f"gradient norm above train.max_grad_norm={t.max_grad_norm:g}")
                    parts.append(f"{what} in {sum(c.values())} update(s) ({', '.join(f'{k} {v}' for k, v in c.items())})")
            msg = f"{'; '.join(parts)} in {where}{f' ({detail})' if detail else ''}; those updates were not applied"
            if t.on_nonfinite == "stop" or self.state.skipped_nonfinite > t.max_skipped:
                error = DivergenceError if not any(counts["non-finite"].values()) else NonFiniteError
                raise error(msg + f" ({self.state.skipped_nonfinite} in this run). {ADVICE}, or set "
                                  f"train.on_nonfinite=skip (train.max_skipped={t.max_skipped}) to go on past them")
            self.rank0.print(f"warning: {msg}; skipped ({self.state.skipped_nonfinite} so far)")
        bad = [k for k, v in weights.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteError(f"non-finite weights in {', '.join(bad)} at step {step}. {ADVICE}")
        if t.max_abs_weight and max(weights.values()) > t.max_abs_weight:
            big = ", ".join(f"{k} {v:.3g}" for k, v in weights.items() if v > t.max_abs_weight)
            raise DivergenceError(f"the training is diverging: largest |weight| above train.max_abs_weight="
                                  f"{t.max_abs_weight:g} at step {step} ({big}). {ADVICE}, or raise "
                                  f"train.max_abs_weight if such weights are expected")
        if t.max_loss and peaks and max(peaks.values()) > t.max_loss:
            big = ", ".join(f"{k} {v:.3g}" for k, v in peaks.items() if v > t.max_loss)
            raise DivergenceError(f"the training is diverging: |loss| above train.max_loss={t.max_loss:g} in "
                                  f"{where} (largest: {big}). {ADVICE}, or raise train.max_loss if such losses are "
                                  f"expected")
