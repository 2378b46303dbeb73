"""Kernels: Gram and blocked forms reproduce the direct recursion (ALGORITHM.md Section 7), operator properties.

Exactness note: the direct, Gram and blocked forms are mathematically identical but sum in different orders, so
v agrees to ~1e-15 relative, not bit for bit. A rounding decision could flip only if xi (or a rounding midpoint)
fell within ~1e-15 of v's fractional part; with float64 and these sizes/seeds that does not happen, so Q is
asserted EXACTLY equal and v to 1e-9 (absolute, v is O(1)).
"""
from __future__ import annotations

import numba
import numpy as np
import pytest

from gptq_helpers import gptq_factor
from onnxspfq import kernels as K
from onnxspfq import reference as R
from onnxspfq import operators as op
from onnxspfq.config import QuantConfig
from onnxspfq.gram import Grams
from onnxspfq.methods import gpfq, spfq
from onnxspfq.prepared import layer_error

OPS = {"stochastic": op.stochastic_round, "nearest": op.nearest_round, "binary": op.stochastic_binary}


def _problem(seed: int = 0, m: int = 50, n0: int = 37, n1: int = 6):
    """X~ != X, correlated columns, one column dead in both, one dead only in X~."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, n0)) @ (np.eye(n0) + 0.3 * rng.standard_normal((n0, n0)))
    Xt = X + 0.2 * rng.standard_normal((m, n0))
    X[:, 4] = 0.0
    Xt[:, 4] = 0.0
    Xt[:, 11] = 0.0
    W = rng.standard_normal((n1, n0))
    xi = rng.random((n1, n0))
    return X, Xt, W, xi


def _params(W, T_name: str, block: bool):
    bits = 1 if T_name == "binary" else 3
    c = 1.3 if bits == 1 else 0.8
    scale, bs = op.step_sizes(W, bits, c, "block" if block else "channel", 8)
    return op.grid_params(scale, bits), bs


@pytest.mark.parametrize("C", [1.0, 2.5, 10.0])
@pytest.mark.parametrize("T_name", ["stochastic", "nearest", "binary"])
def test_merged_forms_equal_direct(C, T_name):
    X, Xt, W, xi = _problem()
    P, bs = _params(W, T_name, block=(T_name != "nearest"))
    T = OPS[T_name]
    G, H = Xt.T @ X, Xt.T @ Xt
    Qd, Vd = R.direct_merged(W, X, Xt, xi, C, T, P, bs)
    Qg, Vg = R.gram_merged(W, G, H, xi, C, T, P, bs)
    Qb, Vb = K.blocked_merged(W, G, H, xi, C, T, P, bs, block=8)  # 37 columns: 4 full blocks + a ragged one
    Q2, V2 = K.blocked_merged(W, G, H, xi, C, T, P, bs, block=16, inner=5)  # two-level: ragged sub-blocks
    assert np.array_equal(Qd, Qg) and np.array_equal(Qd, Qb) and np.array_equal(Qd, Q2)
    np.testing.assert_allclose(V2, Vd, rtol=0, atol=1e-9)
    np.testing.assert_allclose(Vg, Vd, rtol=0, atol=1e-9)
    np.testing.assert_allclose(Vb, Vd, rtol=0, atol=1e-9)
    assert np.all(Qd[:, [4, 11]] == 0) and np.all(Vd[:, [4, 11]] == 0)  # dead columns of X~ get q = 0
    assert np.count_nonzero(Qd) > Qd.size // 2  # a real quantization happened, not an all-zero output


@pytest.mark.parametrize("order", [1, 2, 4])
def test_alignment_forms_equal_direct(order):
    X, Xt, W, _ = _problem(seed=1)
    G, H = Xt.T @ X, Xt.T @ Xt
    Wd = R.direct_align(W, X, Xt, order)
    np.testing.assert_allclose(R.gram_align(W, G, H, order), Wd, rtol=0, atol=1e-9)
    np.testing.assert_allclose(K.blocked_align(W, G, H, order, block=8), Wd, rtol=0, atol=1e-9)
    np.testing.assert_allclose(K.blocked_align(W, G, H, order, block=16, inner=3), Wd, rtol=0, atol=1e-9)
    assert np.all(Wd[:, [4, 11]] == 0)
    # more Gauss-Seidel passes never increase ||X w - X~ w~||^2 (it is a descent method)
    if order > 1:
        prev = R.direct_align(W, X, Xt, order - 1)
        r_now = np.linalg.norm(X @ W.T - Xt @ Wd.T)
        r_prev = np.linalg.norm(X @ W.T - Xt @ prev.T)
        assert r_now <= r_prev + 1e-12


@pytest.mark.parametrize("order", [1, 2, 4])
@pytest.mark.parametrize("C", [1.0, 2.5, 10.0])
@pytest.mark.parametrize("T_name", ["stochastic", "nearest"])
def test_two_phase_forms_equal_direct(order, C, T_name):
    X, Xt, W, xi = _problem(seed=2)
    P, bs = _params(W, T_name, block=False)
    T = OPS[T_name]
    G, H = Xt.T @ X, Xt.T @ Xt
    Qd, Vd = R.direct_phase2(R.direct_align(W, X, Xt, order), Xt, xi, C, T, P, bs)
    Wt = K.blocked_align(W, G, H, order, block=8)
    Qg, Vg = R.gram_phase2(R.gram_align(W, G, H, order), H, xi, C, T, P, bs)
    Qb, Vb = K.blocked_phase2(Wt, H, xi, C, T, P, bs, block=8)
    Q2, _ = K.blocked_phase2(Wt, H, xi, C, T, P, bs, block=16, inner=4)
    assert np.array_equal(Qd, Qg) and np.array_equal(Qd, Qb) and np.array_equal(Qd, Q2)
    np.testing.assert_allclose(Vg, Vd, rtol=0, atol=1e-9)
    np.testing.assert_allclose(Vb, Vd, rtol=0, atol=1e-9)


def test_large_C_is_independent_stochastic_rounding():
    X, _, W, xi = _problem(seed=3)
    P, bs = _params(W, "stochastic", block=False)
    H = X.T @ X
    Q, V = K.blocked_phase2(W, H, xi, 1e15, op.stochastic_round, P, bs, block=8)
    live = np.diag(H) > 0
    # independent stochastic rounding of each weight, written in numpy
    d = P[:, 0, 0][:, None]
    x = W / d
    k = np.clip(np.floor(x) + (xi < x - np.floor(x)), -P[0, 0, 1], P[0, 0, 1])
    assert np.array_equal(Q[:, live], (k * d)[:, live])
    # and with C = 1 the error correction is active: the result differs
    Q1, _ = K.blocked_phase2(W, H, xi, 1.0, op.stochastic_round, P, bs, block=8)
    assert not np.array_equal(Q1, Q)


def test_deterministic_C1_with_same_inputs_is_gpfq():
    X, _, W, _ = _problem(seed=4)
    cfg = QuantConfig(bits=4, c_alpha=1.0, operator="nearest", C=1.0, path="plain")
    Q_spfq, _ = spfq(W, Grams.from_data(X), cfg, np.random.default_rng(0))
    Q_gpfq, _ = gpfq(W, Grams.from_data(X), cfg, np.random.default_rng(0))
    # GPFQ as published (Zhang, Zhou, Saab): u_t = u_{t-1} + w_t X_t - q_t X_t, q_t = Q(<X_t, u_{t-1} + w_t X_t>/||X_t||^2)
    delta = np.abs(W).max(axis=1) / 7
    u = np.zeros((W.shape[0], X.shape[0]))
    Qref = np.zeros_like(W)
    for t in range(W.shape[1]):
        x = X[:, t]
        nrm = x @ x
        if nrm == 0:  # never-active input: onnxspfq rounds w to nearest there (x = 0 leaves u unchanged)
            Qref[:, t] = np.clip(np.rint(W[:, t] / delta), -7, 7) * delta
            continue
        v = (u @ x + W[:, t] * nrm) / nrm
        Qref[:, t] = np.clip(np.rint(v / delta), -7, 7) * delta
        u += np.outer(W[:, t] - Qref[:, t], x)
    assert np.array_equal(Q_spfq, Qref)
    assert np.array_equal(Q_gpfq, Qref)


@pytest.mark.parametrize("v", [-0.93, -0.2, 0.0, 0.37, 1.43])
def test_operators_unbiased(v):
    rng = np.random.default_rng(5)
    xi = rng.random(40000)
    p_grid = np.array([0.5, 3.0])
    p_bin = np.array([2.0, 1.0])
    for T, p in ((op.stochastic_round, p_grid), (op.stochastic_binary, p_bin)):
        s = np.array([T(v, x, p) for x in xi])
        se = s.std() / np.sqrt(s.size) + 1e-12
        assert abs(s.mean() - v) < 4 * se
        assert np.all(np.abs(s - v) <= (p[0] if T is op.stochastic_round else 2 * p[0]))  # |T(v) - v| <= M
    # values sit on the alphabet; outside the range T clips
    assert op.stochastic_round(1.61, 0.0, p_grid) == 1.5
    assert op.nearest_round(0.74, 0.0, p_grid) == 0.5 and op.nearest_round(9.0, 0.0, p_grid) == 1.5
    assert op.stochastic_binary(5.0, 0.99, p_bin) == 2.0 and op.nearest_binary(-0.1, 0.0, p_bin) == -2.0


def test_gram_error_formula_matches_direct():
    X, Xt, W, xi = _problem(seed=6)
    P, bs = _params(W, "stochastic", block=False)
    Q, _ = R.direct_merged(W, X, Xt, xi, 1.0, op.stochastic_round, P, bs)
    sq, rel = layer_error(W, Q, Grams.from_data(X, Xt))
    direct = np.sum((X @ W.T - Xt @ Q.T) ** 2, axis=0)
    np.testing.assert_allclose(sq, direct, rtol=1e-9)
    np.testing.assert_allclose(rel, direct / np.sum((X @ W.T) ** 2, axis=0), rtol=1e-9)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs at least 2 numba threads")
def test_same_seed_same_bytes_on_1_and_2_threads():
    rng = np.random.default_rng(7)
    X = rng.standard_normal((300, 200))
    Xt = X + 0.1 * rng.standard_normal(X.shape)
    W = rng.standard_normal((96, 200))
    stats = Grams.from_data(X, Xt)
    cfg = QuantConfig(bits=3, c_alpha=0.9, C=2.0)
    before = numba.get_num_threads()
    try:
        out = []
        for threads in (1, 2):
            numba.set_num_threads(threads)
            out.append(spfq(W, stats, cfg, np.random.default_rng(42))[0].tobytes())
    finally:
        numba.set_num_threads(before)
    assert out[0] == out[1]


def test_gptq_blocked_equals_unblocked_reference():
    X, _, W, xi = _problem(seed=8)
    U, live = gptq_factor(X)  # upper factor of the damped H^-1
    P, bs = _params(W, "nearest", block=False)
    Q, _ = K.gptq_blocked(np.where(live, W, 0.0), U, live, xi, op.nearest_round, P, bs, block=16, inner=5)
    # textbook OPTQ, one column at a time (Frantar et al., Alg. 1 without lazy batching)
    Wr = np.where(live, W, 0.0)
    Qr = np.zeros_like(W)
    for t in range(W.shape[1]):
        d = P[:, 0, 0]
        Qr[:, t] = np.clip(np.rint(Wr[:, t] / d), -3, 3) * d if live[t] else 0.0
        err = (Wr[:, t] - Qr[:, t]) / U[t, t]
        Wr[:, t + 1:] -= np.outer(err, U[t, t + 1:])
    assert np.array_equal(Q, Qr)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs at least 2 numba threads")
@pytest.mark.parametrize("form", ["phase2", "merged", "merged_nm"])
def test_blocked_row_chunks_equal_gram_and_thread_count_free(form):
    # 160 rows: the blocked engine splits rows into tasks of TASK_ROWS rows pulled by the pool's threads, each
    # running its own GEMMs and sweeps; Q must equal the unblocked Gram form exactly and not depend on the thread
    # count. The call must leave the process's BLAS thread count as it found it (two workers saving and restoring
    # it raced and left every later GEMM of the run on one thread).
    rng = np.random.default_rng(11)
    m, n0, n1 = 90, 48, 160
    X = rng.standard_normal((m, n0)) @ (np.eye(n0) + 0.3 * rng.standard_normal((n0, n0)))
    Xt = X + 0.2 * rng.standard_normal((m, n0))
    Xt[:, 7] = 0.0
    W = rng.standard_normal((n1, n0))
    xi = rng.random((n1, n0))
    P, bs = _params(W, "stochastic", block=True)
    G, H = Xt.T @ X, Xt.T @ Xt
    kw = {"groups": op.nm_groups_for(n0, 4), "nkeep": 2} if form == "merged_nm" else {}
    if form == "phase2":
        ref = R.gram_phase2(W, H, xi, 2.5, op.stochastic_round, P, bs)
        run = lambda: K.blocked_phase2(W, H, xi, 2.5, op.stochastic_round, P, bs, block=16)  # noqa: E731
    else:
        ref = R.gram_merged(W, G, H, xi, 2.5, op.stochastic_round, P, bs, **kw)
        run = lambda: K.blocked_merged(W, G, H, xi, 2.5, op.stochastic_round, P, bs, block=16, **kw)  # noqa: E731
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        assert len(K._tasks(n1)) == 2  # the pool path is what runs here
        setter = K._blas_local_threads()
        blas_before = setter(3) if setter is not None else None
        if setter is not None:
            setter(blas_before)
        Q2, V2 = run()
        if setter is not None:
            assert setter(blas_before) == blas_before
        numba.set_num_threads(1)
        Q1, V1 = run()
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(Q2, ref[0])
    np.testing.assert_allclose(V2, ref[1], rtol=0, atol=1e-9)
    assert Q1.tobytes() == Q2.tobytes() and V1.tobytes() == V2.tobytes()
    assert np.all(Q2[:, 7] == 0)
    if form == "merged_nm":
        kept = np.count_nonzero(Q2.reshape(n1, -1, 4), axis=2)
        assert kept.max() <= 2 and kept.mean() > 1.5  # 2:4 held, and most groups keep two nonzeros


def test_blocked_float32_gemm_close_to_float64():
    # gemm_dtype=float32 (cross-block GEMMs in float32) is an approximation: v within ~1e-5 relative, and only
    # rare rounding decisions may differ from the float64 engine (GPTQ's blocked sweep, the default's kernel, too).
    X, Xt, W, xi = _problem(seed=12, m=120, n0=96, n1=130)
    P, bs = _params(W, "stochastic", block=False)
    G, H = Xt.T @ X, Xt.T @ Xt
    U, live = gptq_factor(Xt)
    Wl = np.where(live, W, 0.0)
    for f64, f32 in (
        (K.gptq_blocked(Wl, U, live, xi, op.nearest_round, P, bs, block=16, inner=5),
         K.gptq_blocked(Wl, U, live, xi, op.nearest_round, P, bs, block=16, inner=5, gemm_dtype=np.float32)),
        (K.blocked_merged(W, G, H, xi, 1.0, op.stochastic_round, P, bs, block=16),
         K.blocked_merged(W, G, H, xi, 1.0, op.stochastic_round, P, bs, block=16, gemm_dtype=np.float32)),
        (K.blocked_phase2(W, H, xi, 1.0, op.stochastic_round, P, bs, block=16),
         K.blocked_phase2(W, H, xi, 1.0, op.stochastic_round, P, bs, block=16, gemm_dtype=np.float32)),
    ):
        np.testing.assert_allclose(f32[1], f64[1], rtol=0, atol=1e-4 * np.abs(f64[1]).max())
        assert np.mean(f32[0] == f64[0]) > 0.999
        assert not np.array_equal(f32[1], f64[1])  # the float32 path really ran


def test_gptq_rows_runs_each_row_with_its_own_factor():
    """gptq_rows (one U and live mask per row: Grams.stack) gives each row what gptq_blocked gives that row alone."""
    rows = []
    for seed in range(4):
        X, _, W, xi = _problem(seed=20 + seed, n0=13, n1=1)
        if seed == 1:
            X[:, 3] = 0.0  # a dead column in one row only
        U, live = gptq_factor(X)
        rows.append((W, xi, U, live))
    W, xi = np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])
    U, live = np.stack([r[2] for r in rows]), np.stack([r[3] for r in rows])
    P, bs = _params(W, "nearest", block=False)
    Q, V = K.gptq_rows(np.where(live, W, 0.0), U, live, xi, op.nearest_round, P, bs)
    for n, (w, x, u, lv) in enumerate(rows):
        q, v = K.gptq_blocked(np.where(lv, w, 0.0), u, lv, x, op.nearest_round, P[n:n + 1], bs)
        assert np.array_equal(Q[n:n + 1], q) and np.array_equal(V[n:n + 1], v)
