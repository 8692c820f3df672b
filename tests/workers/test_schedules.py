import math

import pytest

from workers.schedules import ScheduleError, allr_initial_lr, dense_schedule, retrain_schedule, warmup_steps

ETA = 0.1
D = 200
DENSE = dense_schedule("linear", ETA, D)
N = 100
W = 10            # round(0.1 N)
R = N - W
ETA_MIN = DENSE[-1]


def test_dense_linear_schedule_values():
    assert DENSE[0] == pytest.approx(ETA)
    assert DENSE[D // 2] == pytest.approx(ETA / 2)
    assert DENSE[-1] == pytest.approx(ETA / D)
    assert len(DENSE) == D


def test_dense_cosine_and_constant():
    cos = dense_schedule("cosine", ETA, D)
    assert cos[0] == pytest.approx(ETA) and cos[D // 2] == pytest.approx(ETA / 2)
    assert dense_schedule("constant", ETA, 5) == [ETA] * 5


@pytest.mark.parametrize("kind", ["slr", "clr", "llr", "allr"])
def test_warmup_reaches_eta0_at_warmup_end(kind):
    lrs = retrain_schedule(kind, N, DENSE, norm_drop=0.5, rate=0.25, phase_epochs=5, dense_epochs=10)
    assert warmup_steps(kind, N) == W
    eta0 = ETA if kind != "allr" else allr_initial_lr(ETA, 0.5, 0.25, 5, 10)
    assert lrs[0] == pytest.approx(eta0 / W)
    assert lrs[W - 1] == pytest.approx(eta0)
    assert len(lrs) == N


def test_llr_midway_and_last_step():
    lrs = retrain_schedule("llr", N, DENSE)
    assert lrs[W] == pytest.approx(ETA)
    assert lrs[W + R // 2] == pytest.approx(ETA * (1 - (R // 2) / R))
    assert lrs[-1] == pytest.approx(ETA / R)


def test_clr_midway_and_last_step():
    lrs = retrain_schedule("clr", N, DENSE)
    assert lrs[W + R // 2] == pytest.approx((ETA + ETA_MIN) / 2)
    assert lrs[-1] == pytest.approx(ETA_MIN + (ETA - ETA_MIN) * (1 + math.cos(math.pi * (R - 1) / R)) / 2)


def test_slr_is_the_dense_schedule_compressed():
    lrs = retrain_schedule("slr", N, DENSE)
    assert lrs[W] == pytest.approx(DENSE[0])
    assert lrs[W + R // 2] == pytest.approx(DENSE[(R // 2) * D // R])
    assert lrs[-1] == pytest.approx(DENSE[(R - 1) * D // R])


def test_ft_and_lrw():
    assert retrain_schedule("ft", N, DENSE) == pytest.approx([ETA_MIN] * N)
    lrw = retrain_schedule("lrw", N, DENSE)
    assert lrw == pytest.approx(DENSE[-N:])
    assert retrain_schedule("lrw", 2 * D, DENSE)[0] == pytest.approx(DENSE[0])   # longer than the dense run


def test_cosine_and_constant_retraining():
    cos = retrain_schedule("cosine", N, DENSE)
    assert cos[0] == pytest.approx(ETA) and cos[N // 2] == pytest.approx(ETA / 2)
    assert cos[-1] == pytest.approx(ETA * (1 + math.cos(math.pi * (N - 1) / N)) / 2)
    assert retrain_schedule("constant", N, DENSE, lr=0.03) == pytest.approx([0.03] * N)


def test_allr_initial_lr_formula_and_clipping():
    # eta_max * d / sqrt(p) inside the bounds
    assert allr_initial_lr(0.1, 0.2, 0.25, 1, 100) == pytest.approx(0.1 * 0.2 / 0.5)
    # clipped above at eta_max
    assert allr_initial_lr(0.1, 0.9, 0.25, 1, 100) == pytest.approx(0.1)
    # clipped below at lo = min(E_phase / E_dense, 1) * eta_max
    assert allr_initial_lr(0.1, 0.001, 0.25, 5, 10) == pytest.approx(0.05)
    lrs = retrain_schedule("allr", N, DENSE, norm_drop=0.2, rate=0.25, phase_epochs=1, dense_epochs=100)
    assert max(lrs) == pytest.approx(0.04)
    assert lrs[-1] == pytest.approx(0.04 / R)


def test_explicit_lr_replaces_eta_max_and_scales_dense_derived_schedules():
    assert retrain_schedule("llr", N, DENSE, lr=0.05)[W - 1] == pytest.approx(0.05)
    assert retrain_schedule("ft", N, DENSE, lr=0.05)[0] == pytest.approx(ETA_MIN / 2)


def test_bad_schedules_are_refused():
    with pytest.raises(ScheduleError, match="unknown retraining schedule"):
        retrain_schedule("nope", N, DENSE)
    with pytest.raises(ScheduleError, match="allr needs"):
        retrain_schedule("allr", N, DENSE)
    with pytest.raises(ScheduleError, match="at least one step"):
        dense_schedule("linear", 0.1, 0)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_dense_warmup_ramps_linearly_then_follows_the_schedule(kind):
    lrs = dense_schedule(kind, 0.1, 200, warmup=0.05)
    assert len(lrs) == 200
    assert lrs[:10] == pytest.approx([0.1 * (i + 1) / 10 for i in range(10)])   # W = 10 steps up to the peak
    assert max(lrs) == pytest.approx(0.1)
    assert lrs[10:] == pytest.approx(dense_schedule(kind, 0.1, 190))            # then the schedule over R = 190
    assert dense_schedule(kind, 0.1, 200, warmup=0.0) == dense_schedule(kind, 0.1, 200)
