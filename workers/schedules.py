"""Per-step learning-rate schedules for dense training and for retraining after pruning.

A schedule is a list of N per-step learning rates (step i uses ``lrs[i]``). The dense run records
its schedule so that the retraining schedules can be derived from it:

    eta_max = peak of the dense schedule, eta_min = its final LR, D = its length
    (dense: a short linear warm-up, then linear, cosine or constant; see `dense_schedule`).

For retraining over N steps, W = round(0.1 N) warm-up steps (slr, clr, llr, allr) and R = N - W:

    warm-up      lr(i)     = eta_target * (i + 1) / W                  for i < W (reaches eta_target at i = W - 1)
    ft           lr(i)     = eta_min
    lrw          lr(i)     = dense[max(0, D - N + i)]                   (replay the last N dense steps)
    slr          lr(W + j) = dense[floor(j * D / R)]                    (the dense schedule compressed to R steps)
    clr          lr(W + j) = eta_min + (eta_max - eta_min) * (1 + cos(pi j / R)) / 2
    llr          lr(W + j) = eta_0 * (1 - j / R),     eta_0 = eta_max
    allr         like llr, eta_0 = clip(eta_max * d / sqrt(p), lo, eta_max),  lo = min(E_phase / E_dense, 1) * eta_max
    cosine       lr(i)     = eta_max * (1 + cos(pi i / N)) / 2          (no warm-up)
    constant     lr(i)     = eta_max

with j = 0..R-1, d = relative L2 norm of the weights this phase's pruning removed and p = the
per-phase pruning fraction. A retraining LR given explicitly (``lr``) replaces eta_max and scales
the dense-derived schedules (ft, lrw, slr) by lr / eta_max, so varying it changes every schedule.
"""

from __future__ import annotations

import math

DENSE_SCHEDULES = ("linear", "cosine", "constant")
RETRAIN_SCHEDULES = ("ft", "lrw", "slr", "clr", "llr", "allr", "cosine", "constant")
WARMUP_SCHEDULES = ("slr", "clr", "llr", "allr")


class ScheduleError(ValueError):
    """An unknown schedule or arguments it cannot use."""


def dense_schedule(kind: str, lr: float, steps: int, warmup: float = 0.0) -> list[float]:
    """Budgeted dense training over N steps: W = round(warmup * N) warm-up steps lr (i + 1) / W, then
    over the R = N - W steps left: linear lr (1 - j/R); cosine lr (1 + cos(pi j/R))/2; constant lr.

    The warm-up keeps the first steps of a fresh network from diverging at a large peak LR."""
    if steps < 1:
        raise ScheduleError(f"a schedule needs at least one step, got {steps}")
    if kind not in DENSE_SCHEDULES:
        raise ScheduleError(f"unknown dense schedule {kind!r}; known: {', '.join(DENSE_SCHEDULES)}")
    if not 0.0 <= warmup < 1.0:
        raise ScheduleError(f"the warm-up share must be in [0, 1), got {warmup}")
    W = min(round(warmup * steps), steps - 1)
    R = steps - W
    warm = [lr * (i + 1) / W for i in range(W)]
    if kind == "linear":
        return warm + [lr * (1.0 - j / R) for j in range(R)]
    if kind == "cosine":
        return warm + [lr * (1.0 + math.cos(math.pi * j / R)) / 2.0 for j in range(R)]
    return warm + [lr] * R


def warmup_steps(kind: str, steps: int) -> int:
    """W = round(0.1 N) for the warm-up schedules, 0 otherwise."""
    return round(0.1 * steps) if kind in WARMUP_SCHEDULES else 0


def allr_initial_lr(eta_max: float, norm_drop: float, rate: float, phase_epochs: float,
                    dense_epochs: float) -> float:
    """eta_0 = clip(eta_max * d / sqrt(p), lo, eta_max) with lo = min(E_phase / E_dense, 1) * eta_max."""
    if rate <= 0:
        return eta_max
    lo = min(phase_epochs / dense_epochs, 1.0) * eta_max if dense_epochs > 0 else eta_max
    return min(max(eta_max * norm_drop / math.sqrt(rate), lo), eta_max)


def retrain_schedule(kind: str, steps: int, dense_lrs: list[float], *, lr: float | None = None,
                     norm_drop: float | None = None, rate: float | None = None,
                     phase_epochs: float | None = None, dense_epochs: float | None = None) -> list[float]:
    """Per-step LRs for one retraining phase of `steps` steps (formulas in the module docstring).

    `dense_lrs` is the dense run's recorded per-step schedule; `lr` overrides eta_max. allr also
    needs `norm_drop` (d), `rate` (p), `phase_epochs` and `dense_epochs`.
    """
    if steps < 1:
        raise ScheduleError(f"a schedule needs at least one step, got {steps}")
    if kind not in RETRAIN_SCHEDULES:
        raise ScheduleError(f"unknown retraining schedule {kind!r}; known: {', '.join(RETRAIN_SCHEDULES)}")
    if not dense_lrs:
        raise ScheduleError("retraining schedules need the dense run's per-step LRs")
    peak, final, D = max(dense_lrs), dense_lrs[-1], len(dense_lrs)
    eta_max = peak if lr is None else lr
    scale = eta_max / peak if peak > 0 else 1.0
    eta_min = final * scale

    if kind == "ft":
        return [eta_min] * steps
    if kind == "lrw":
        return [dense_lrs[max(0, D - steps + i)] * scale for i in range(steps)]
    if kind == "cosine":
        return [eta_max * (1.0 + math.cos(math.pi * i / steps)) / 2.0 for i in range(steps)]
    if kind == "constant":
        return [eta_max] * steps

    if kind == "allr":
        if norm_drop is None or rate is None or phase_epochs is None or dense_epochs is None:
            raise ScheduleError("allr needs norm_drop, rate, phase_epochs and dense_epochs")
        eta_0 = allr_initial_lr(eta_max, norm_drop, rate, phase_epochs, dense_epochs)
    else:
        eta_0 = eta_max
    W = warmup_steps(kind, steps)
    R = steps - W
    warm = [eta_0 * (i + 1) / W for i in range(W)]
    if kind == "slr":
        decay = [dense_lrs[min(D - 1, (j * D) // R)] * scale for j in range(R)]
    elif kind == "clr":
        decay = [eta_min + (eta_max - eta_min) * (1.0 + math.cos(math.pi * j / R)) / 2.0 for j in range(R)]
    else:  # llr, allr
        decay = [eta_0 * (1.0 - j / R) for j in range(R)]
    return warm + decay
