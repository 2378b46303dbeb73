"""Methods (spfq, gpfq, gptq, rtn): codes/scales contract, errors, c_alpha choice, real-data quality vs RTN."""
from __future__ import annotations

import dataclasses
import gzip
import math
from pathlib import Path

import numpy as np
import pytest

from onnxspfq import kernels as K
from onnxspfq import reference as R
from onnxspfq import operators as op
from onnxspfq.config import CompressConfig, QuantConfig
from onnxspfq.errors import OnnxspfqError
from onnxspfq.gram import Grams
from onnxspfq.methods import FEW_ROWS_DAMP, METHODS, gptq, spfq
from onnxspfq.prepared import LayerResult, layer_error
from onnxspfq.search import CANDIDATES, _candidates

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason=f"real data missing: {FMNIST} "
                                  "(apt-get install dataset-fashion-mnist)")


def _fmnist(n: int) -> np.ndarray:
    """The first n Fashion-MNIST training images as (n, 28, 28) floats in [0, 1] (idx3 format, 16-byte header)."""
    with gzip.open(FMNIST) as f:
        f.read(16)
        return np.frombuffer(f.read(n * 784), np.uint8).reshape(n, 28, 28).astype(np.float64) / 255.0


def _random_layer(seed=0, m=200, n0=48, n1=20, same=False):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, n0)) @ (np.eye(n0) + 0.3 * rng.standard_normal((n0, n0)))
    X[:, 5] = 0.0
    Xt = X if same else X + 0.1 * rng.standard_normal((m, n0))
    if not same:
        Xt[:, 5] = 0.0
    W = rng.standard_normal((n1, n0))
    return W, X, Xt, Grams.from_data(X, None if same else Xt)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("bits", [8, 4, 3, 2, 1])
@pytest.mark.parametrize("granularity", ["channel", "layer", "block"])
def test_codes_times_scale_is_Q_exactly(name, bits, granularity):
    W, X, Xt, stats = _random_layer(seed=bits)
    cfg = QuantConfig(bits=bits, granularity=granularity, block_size=10, C=3.0 if bits == 1 else 1.0)
    Q, info = METHODS[name](W, stats, cfg, np.random.default_rng(0))
    n1, n0 = W.shape
    assert isinstance(info, LayerResult) and Q.dtype == np.float64 and Q.shape == W.shape
    assert info.codes.dtype == np.int8 and info.codes.shape == W.shape and info.scale.dtype == np.float64
    nblocks = -(-n0 // 10) if granularity == "block" else 1
    assert info.scale.shape == (n1, nblocks) and info.block_size == (10 if granularity == "block" else n0)
    assert np.array_equal(Q, info.codes * np.repeat(info.scale, info.block_size, axis=1)[:, :n0])
    Kmax = cfg.levels
    if bits == 1:
        assert set(np.unique(info.codes)) <= {-1, 1}
        if name == "rtn":  # classical binary-weight baseline: a = mean|w| over what the step covers, no c_alpha
            assert info.c_alpha is None
            if granularity == "channel":
                np.testing.assert_allclose(info.scale[:, 0], np.abs(W).mean(axis=1), rtol=1e-12)
        elif granularity == "channel":  # a_n = c_alpha_n * max|w_n|, c_alpha_n chosen per channel
            np.testing.assert_allclose(info.scale[:, 0], info.c_alpha_row * np.abs(W).max(axis=1), rtol=1e-12)
    else:
        assert np.abs(info.codes).max() <= Kmax
        # dead input column (never active on the calibration data): rounded to nearest, as rtn does
        step = np.repeat(info.scale, info.block_size, axis=1)[:, :W.shape[1]]
        np.testing.assert_array_equal(info.codes[:, 5], np.clip(np.rint(W[:, 5] / step[:, 5]), -Kmax, Kmax))
    if granularity == "layer":
        assert np.all(info.scale == info.scale[0, 0])
    # reported errors are the exact Gram errors of the returned Q
    sq, rel = layer_error(W, Q, stats)
    np.testing.assert_allclose(info.sq_error, sq, rtol=1e-12)
    np.testing.assert_allclose(info.rel_error, rel, rtol=1e-12)
    direct = np.sum((X @ W.T - Xt @ Q.T) ** 2, axis=0)
    np.testing.assert_allclose(info.sq_error, direct, rtol=1e-8, atol=1e-9 * direct.max())
    assert 0.0 <= info.clip_fraction <= 1.0 and info.method == name
    if not (name == "rtn" and bits == 1):
        chosen = info.c_alpha_row if granularity != "layer" else np.array([info.c_alpha])
        assert set(chosen) <= set(_candidates(cfg, name == "spfq" and cfg.T == "stochastic"))
        assert info.c_alpha == pytest.approx(float(np.mean(chosen)))
    assert info.sparsity == np.mean(Q == 0) and info.threshold is None


def test_c_alpha_explicit_and_search():
    W, _, _, stats = _random_layer(seed=1, n1=100)
    Q1, info1 = spfq(W, stats, QuantConfig(bits=4, c_alpha=0.77), np.random.default_rng(0))
    assert info1.c_alpha == 0.77 and info1.c_alpha_row is None
    np.testing.assert_allclose(info1.scale[:, 0], 0.77 * np.abs(W).max(axis=1) / 7)
    # per channel, screen 0: every candidate runs on every row with the same xi; each row keeps the smallest error
    Q2, info2 = spfq(W, stats, QuantConfig(bits=4, draws=1, screen=0), np.random.default_rng(0))
    runs = {c: spfq(W, stats, QuantConfig(bits=4, c_alpha=c, draws=1), np.random.default_rng(0))
            for c in CANDIDATES[4]}
    errs = np.stack([runs[c][1].sq_error for c in CANDIDATES[4]])
    np.testing.assert_allclose(info2.sq_error, errs.min(axis=0), rtol=1e-12)
    for n in range(W.shape[0]):
        np.testing.assert_array_equal(Q2[n], runs[info2.c_alpha_row[n]][0][n])
    assert len(set(info2.c_alpha_row)) > 1  # the choice really differs between rows on this layer
    # per layer (one shared step): one multiplier for the whole layer, picked on the search rows
    _, info3 = spfq(W, stats, QuantConfig(bits=4, granularity="layer"), np.random.default_rng(0))
    assert info3.c_alpha in CANDIDATES[4] and info3.c_alpha_row is None
    full = {c: spfq(W, stats, QuantConfig(bits=4, c_alpha=c, granularity="layer"), np.random.default_rng(0))[1]
            .sq_error.sum() for c in CANDIDATES[4]}
    assert full[info3.c_alpha] <= 1.25 * min(full.values())


def test_screening_runs_the_two_candidates_rounding_ranks_best():
    """Default screen at 4 bits: each row runs the path following only with the 2 candidates whose plain rounding
    has the smallest OPTQ loss sum_t (w_t - q_t)^2 / U_tt^2; 1 / U_tt^2 is the Schur complement of H's trailing
    block at t (computed here directly, one inverse per column), and the row keeps the better of the two."""
    W, _, _, stats = _random_layer(seed=1, n1=100)
    cfg = QuantConfig(bits=4)
    assert cfg.n_screen == 2 and QuantConfig(bits=2).n_screen == 0
    Q, info = gptq(W, stats, cfg, np.random.default_rng(0))
    runs = {c: gptq(W, stats, QuantConfig(bits=4, c_alpha=c), np.random.default_rng(0)) for c in CANDIDATES[4]}
    full, _ = gptq(W, stats, QuantConfig(bits=4, screen=0), np.random.default_rng(0))
    H = np.asarray(stats.H, dtype=np.float64)
    live = np.diag(H) > 0
    Hd = H.copy()
    Hd[~live, ~live] = 1.0
    Hd[np.diag_indices_from(Hd)] += cfg.damp * np.diag(H)[live].mean()
    schur = np.array([1.0 / np.linalg.inv(Hd[t:, t:])[0, 0] for t in range(H.shape[0])]) * live
    Wl = np.where(live, W, 0.0)
    loss = []
    for c in CANDIDATES[4]:
        step = c * np.abs(W).max(axis=1, keepdims=True) / 7
        loss.append(((Wl - np.clip(np.rint(Wl / step), -7, 7) * step) ** 2) @ schur)
    top2 = np.argsort(np.array(loss), axis=0, kind="stable")[:2]
    errs = np.stack([runs[c][1].sq_error for c in CANDIDATES[4]])
    for n in range(W.shape[0]):
        a, b = top2[:, n]
        c = CANDIDATES[4][a] if errs[a, n] <= errs[b, n] else CANDIDATES[4][b]
        assert info.c_alpha_row[n] == c
        np.testing.assert_array_equal(Q[n], runs[c][0][n])
    assert info.sq_error.sum() >= layer_error(W, full, stats)[0].sum() - 1e-9  # never better than every candidate
    assert len(np.unique(top2[0])) > 1  # the ranking really differs between rows


def test_best_of_draws_per_channel():
    """draws = k keeps per row the best of k complete runs: never worse than draw 1, and the default at 1-2 bits."""
    W, _, _, stats = _random_layer(seed=4, n1=40)
    sto = dict(bits=2, c_alpha=0.6, operator="stochastic")
    one = spfq(W, stats, QuantConfig(**sto, draws=1), np.random.default_rng(3))[1]
    eight = spfq(W, stats, QuantConfig(**sto, draws=8), np.random.default_rng(3))[1]
    assert np.all(eight.sq_error <= one.sq_error) and eight.sq_error.sum() < 0.9 * one.sq_error.sum()
    default = spfq(W, stats, QuantConfig(**sto), np.random.default_rng(3))[1]
    np.testing.assert_array_equal(default.codes, eight.codes)
    assert QuantConfig(bits=4).n_draws == 1 and QuantConfig(bits=1).n_draws == 8
    assert QuantConfig(bits=2, sparsity=0.5).n_draws == 1
    again = spfq(W, stats, QuantConfig(**sto, draws=8), np.random.default_rng(3))[1]
    assert again.codes.tobytes() == eight.codes.tobytes()
    with pytest.raises(OnnxspfqError, match="draws"):
        QuantConfig(bits=2, sparsity=0.5, draws=4)
    with pytest.raises(OnnxspfqError, match="draws"):
        QuantConfig(bits=2, draws=0)


def test_seed_reproducible_and_stochastic():
    W, _, _, stats = _random_layer(seed=2)
    cfg = QuantConfig(bits=3, c_alpha=0.9, operator="stochastic")
    a = spfq(W, stats, cfg, np.random.default_rng(1))[0]
    b = spfq(W, stats, cfg, np.random.default_rng(1))[0]
    c = spfq(W, stats, cfg, np.random.default_rng(2))[0]
    assert a.tobytes() == b.tobytes() and not np.array_equal(a, c)


def test_two_phase_and_perfect_alignment_run_and_align():
    W, X, Xt, stats = _random_layer(seed=3, m=300)
    for cfg in (QuantConfig(bits=4, c_alpha=1.0, order=3), QuantConfig(bits=4, c_alpha=1.0, perfect_alignment=True)):
        Q, info = spfq(W, stats, cfg, np.random.default_rng(0))
        assert np.all(np.isfinite(info.rel_error)) and info.rel_error.mean() < 0.1
    # spfq with order r equals the direct two-phase reference (same xi drawn from the same seed)
    cfg = QuantConfig(bits=4, c_alpha=1.0, order=2, C=2.5, operator="stochastic")
    Q, _ = spfq(W, stats, cfg, np.random.default_rng(9))
    scale, bs = op.step_sizes(W, 4, 1.0, "channel", 1)
    xi = np.random.default_rng(9).random(W.shape)
    Qd, _ = R.direct_phase2(R.direct_align(W, X, Xt, 2), Xt, xi, 2.5, op.stochastic_round, op.grid_params(scale, 4), bs)
    live = np.diag(stats.H) > 0
    assert not live.all()  # the dead column is exercised
    assert np.array_equal(Q[:, live], Qd[:, live])
    # dead columns: the kernel's q = 0 is replaced by nearest rounding of w (the method's documented choice)
    np.testing.assert_array_equal(Q[:, ~live], np.clip(np.rint(W[:, ~live] / scale), -7, 7) * scale)


def test_bad_input_raises_one_line_errors():
    W, _, _, stats = _random_layer()
    cfg = QuantConfig(bits=4, c_alpha=1.0)
    with pytest.raises(OnnxspfqError, match="input columns"):
        spfq(W[:, :-1], stats, cfg, np.random.default_rng(0))
    bad = W.copy()
    bad[0, 0] = np.nan
    with pytest.raises(OnnxspfqError, match="NaN"):
        spfq(bad, stats, cfg, np.random.default_rng(0))
    with pytest.raises(OnnxspfqError, match="Generator"):
        spfq(W, stats, cfg, 0)
    with pytest.raises(OnnxspfqError, match="not positive definite"):
        METHODS["gptq"](W, Grams.from_data(np.ones((3, W.shape[1]))), QuantConfig(bits=4, damp=0.0),
                        np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------------------
# Real layer inputs: Fashion-MNIST images.
# ---------------------------------------------------------------------------------------------------------------

@needs_fmnist
@pytest.mark.parametrize("same", [True, False])
def test_real_images_path_following_beats_rtn(same):
    """Rows = 1200 real 28x28 images (N0 = 784, with always-black pixels); W = the top 32 principal directions.

    X~ != X case: the input as seen after an earlier 3-bit quantization (pixels rounded to 8 levels).
    """
    X = _fmnist(1200).reshape(1200, 784)
    Xt = X if same else np.round(X * 7) / 7
    W = np.linalg.svd(X - X.mean(axis=0), full_matrices=False)[2][:32]
    stats = Grams.from_data(X, None if same else Xt)
    assert np.any(np.diag(stats.H) == 0)  # real data has dead columns; they are exercised here
    for bits in (4, 3, 2):
        cfg = QuantConfig(bits=bits)
        err = {name: f(W, stats, cfg, np.random.default_rng(0))[1].sq_error.sum() for name, f in METHODS.items()}
        for name in ("spfq", "gpfq", "gptq"):
            assert err[name] < err["rtn"], (bits, err)
    # 1-bit end to end on real data with damped correction (C = 2): codes +-1 and still better than RTN
    cfg = QuantConfig(bits=1, C=2.0)
    Q, info = spfq(W, stats, cfg, np.random.default_rng(0))
    _, info_rtn = METHODS["rtn"](W, stats, cfg, np.random.default_rng(0))
    assert set(np.unique(info.codes)) == {-1, 1} and info.sq_error.sum() < info_rtn.sq_error.sum()


@needs_fmnist
@pytest.mark.parametrize("C", [1.0, 2.5, 10.0])
def test_real_patches_blocked_equals_direct(C):
    """Forms agree on real layer inputs: 6x6 patches (im2col, stride 3) of real images, W from a least-squares fit."""
    img = _fmnist(12)
    patches = np.lib.stride_tricks.sliding_window_view(img, (6, 6), axis=(1, 2))[:, ::3, ::3]
    X = patches.reshape(-1, 36)  # 12 images x 8 x 8 positions = 768 rows, includes all-black columns
    Xt = np.round(X * 7) / 7
    rng = np.random.default_rng(0)
    target = X @ rng.standard_normal((36, 8)) + 0.1 * rng.standard_normal((X.shape[0], 8))
    W = np.linalg.lstsq(X + 1e-3 * rng.standard_normal(X.shape), target, rcond=None)[0].T  # (8, 36)
    G, H = Xt.T @ X, Xt.T @ Xt
    xi = rng.random(W.shape)
    for T, bits in ((op.stochastic_round, 4), (op.stochastic_binary, 1)):
        scale, bs = op.step_sizes(W, bits, 1.0, "channel", 1)
        P = op.grid_params(scale, bits)
        Qd, Vd = R.direct_merged(W, X, Xt, xi, C, T, P, bs)
        Qb, Vb = K.blocked_merged(W, G, H, xi, C, T, P, bs, block=16)
        assert np.array_equal(Qd, Qb)
        np.testing.assert_allclose(Vb, Vd, rtol=0, atol=1e-9 * max(1.0, np.abs(Vd).max()))


def test_refit_scale_never_increases_the_exact_error():
    """Section 6 re-fit: for the codes path following chose, the re-fitted step is the least-squares optimum,
    so the exact Gram error of every row can only fall."""
    from onnxspfq.config import QuantConfig
    from onnxspfq.gram import Grams
    from onnxspfq.methods import spfq

    rng = np.random.default_rng(3)
    X = rng.standard_normal((400, 48)) @ rng.standard_normal((48, 48))
    Xt = X + 0.05 * rng.standard_normal(X.shape)
    W = rng.standard_normal((16, 48))
    stats = Grams.from_data(X, Xt)
    for bits in (1, 2, 4):
        _, plain = spfq(W, stats, QuantConfig(bits=bits, c_alpha=1.0), np.random.default_rng(0))
        Q, fit = spfq(W, stats, QuantConfig(bits=bits, c_alpha=1.0, refit_scale=True), np.random.default_rng(0))
        assert np.array_equal(plain.codes, fit.codes)
        assert np.all(fit.sq_error <= plain.sq_error * (1 + 1e-12))
        assert fit.sq_error.sum() < plain.sq_error.sum()
        assert np.array_equal(Q, fit.codes * fit.scale)


@pytest.mark.parametrize("name", ["spfq", "gpfq", "gptq"])
def test_act_order_is_the_method_on_permuted_columns(name):
    """act_order runs the same method on the columns sorted by decreasing diag(H) and returns Q in the caller's
    order: identical to permuting W and the Grams by hand, running, and permuting back."""
    W, X, Xt, stats = _random_layer(seed=5)
    perm = np.argsort(-np.diag(stats.H), kind="stable")
    assert not np.array_equal(perm, np.arange(len(perm)))
    cfg = QuantConfig(bits=3, c_alpha=0.9, draws=1, act_order=False)
    Q, info = METHODS[name](W, stats, dataclasses.replace(cfg, act_order=True), np.random.default_rng(0))
    Qp, infop = METHODS[name](W[:, perm], Grams.from_data(X[:, perm], Xt[:, perm]), cfg, np.random.default_rng(0))
    inv = np.argsort(perm)
    np.testing.assert_allclose(Q, Qp[:, inv], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(info.codes, infop.codes[:, inv])
    np.testing.assert_allclose(info.sq_error, layer_error(W, Q, stats)[0], rtol=1e-9)
    with pytest.raises(OnnxspfqError, match="act-order"):
        QuantConfig(bits=4, act_order=True, granularity="block")


def test_default_route_per_setting():
    """What the default spfq runs (config.py: route, ordered), and the settings that select the plain path."""
    for bits in (8, 4, 3):
        assert QuantConfig(bits=bits).route == "projected" and QuantConfig(bits=bits).T == "nearest"
    assert QuantConfig(bits=2).route == "best" and QuantConfig(bits=1).route == "best"
    for plain in (dict(operator="stochastic"), dict(sparsity=0.5), dict(nm=(2, 4)), dict(C=2.0), dict(order=2),
                  dict(perfect_alignment=True), dict(path="plain")):
        assert QuantConfig(bits=4, **plain).route == "plain", plain
    assert QuantConfig(bits=4, path="best").route == "best" and QuantConfig(bits=None, sparsity=0.5).route == "plain"
    assert QuantConfig(bits=4).ordered("spfq") and QuantConfig(bits=2).ordered("spfq")
    assert not any(QuantConfig(bits=4).ordered(m) for m in ("gptq", "gpfq", "rtn"))
    assert not QuantConfig(bits=4, granularity="block").ordered("spfq")
    assert not QuantConfig(bits=4, operator="stochastic").ordered("spfq")
    assert QuantConfig(bits=4, act_order=True).ordered("gptq") and not QuantConfig(bits=4, act_order=False).ordered("spfq")
    with pytest.raises(OnnxspfqError, match="path"):
        QuantConfig(bits=4, path="curved")


def test_default_spfq_is_the_projected_path_in_act_order():
    """At 3-8 bits the default spfq is OPTQ's projected path in act-order on the ridge-aligned weights: with the
    alignment off (align_ridge inf) bit-identical to gptq with act_order on (m >= 2 N0 rows: the same damping), and
    with X~ = X the alignment is W itself; with fewer rows its damping rises to FEW_ROWS_DAMP, which then equals gptq
    at that damping and differs from gptq at the published 0.01."""
    W, X, Xt, stats = _random_layer(seed=6, m=200, n0=48)
    same = Grams.from_data(X)
    for bits in (8, 4, 3):
        Q, info = spfq(W, stats, QuantConfig(bits=bits, align_ridge=math.inf), np.random.default_rng(0))
        Qg, _ = gptq(W, stats, QuantConfig(bits=bits, act_order=True), np.random.default_rng(0))
        assert Q.tobytes() == Qg.tobytes() and info.form_row is None
        Qs, _ = spfq(W, same, QuantConfig(bits=bits), np.random.default_rng(0))
        Qsg, _ = gptq(W, same, QuantConfig(bits=bits, act_order=True), np.random.default_rng(0))
        assert Qs.tobytes() == Qsg.tobytes()
    few = Grams.from_data(X[:60], Xt[:60])  # 60 rows < 2 N0 = 96
    cfg = QuantConfig(bits=4, align_ridge=math.inf)
    Q, _ = spfq(W, few, cfg, np.random.default_rng(0))
    Qd, _ = gptq(W, few, QuantConfig(bits=4, act_order=True, damp=FEW_ROWS_DAMP), np.random.default_rng(0))
    Q0, _ = gptq(W, few, QuantConfig(bits=4, act_order=True), np.random.default_rng(0))
    assert Q.tobytes() == Qd.tobytes() and not np.array_equal(Q, Q0)


def test_ridge_alignment_solves_its_normal_equations_and_corrects_the_input_error():
    """Phase I of the projected path: (H + eps I) w~ = G w + eps w with eps = ridge * mean(diag H); ridge -> inf
    gives W, ridge -> 0 the least-squares alignment. With X~ = X M (earlier layers bent the input), the aligned path
    follows X w far better than quantizing W itself at 8 bits (the alignment's purpose), and better at 4 bits."""
    from onnxspfq.methods import _ridge_align
    from onnxspfq.prepared import prepare

    rng = np.random.default_rng(8)
    X = rng.standard_normal((400, 24))
    Xt = X @ (np.eye(24) + 0.05 * rng.standard_normal((24, 24)))
    W = rng.standard_normal((16, 24))
    L = prepare(W, Grams.from_data(X, Xt))
    eps = 1.0 * L.d.mean()
    Wt = _ridge_align(L, 1.0)
    np.testing.assert_allclose((L.H + eps * np.eye(24)) @ Wt.T, L.G @ W.T + eps * W.T, rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(_ridge_align(L, 1e12), W, atol=1e-8)
    np.testing.assert_allclose(_ridge_align(L, 0.0), np.linalg.solve(L.H, L.G @ W.T).T, rtol=1e-8, atol=1e-10)
    for bits, factor in ((8, 0.5), (4, 0.9)):
        aligned = spfq(W, Grams.from_data(X, Xt), QuantConfig(bits=bits), np.random.default_rng(0))[1].sq_error.sum()
        plain_w = spfq(W, Grams.from_data(X, Xt), QuantConfig(bits=bits, align_ridge=math.inf),
                       np.random.default_rng(0))[1].sq_error.sum()
        assert aligned < factor * plain_w, (bits, aligned, plain_w)
    with pytest.raises(OnnxspfqError, match="align_ridge"):
        QuantConfig(align_ridge=-1.0)


def test_best_path_keeps_per_row_the_smaller_exact_error():
    """path best runs the plain and the projected path and each output channel keeps the smaller exact error
    (ties: plain); every kept row is one complete run of its path, and the report names the path per row."""
    W, X, Xt, stats = _random_layer(seed=7, n1=40)
    cfg = QuantConfig(bits=2, c_alpha=0.6, act_order=True)
    assert cfg.route == "best"
    Qb, best = spfq(W, stats, cfg, np.random.default_rng(0))
    Qp, plain = spfq(W, stats, dataclasses.replace(cfg, path="plain"), np.random.default_rng(0))
    Qj, proj = spfq(W, stats, dataclasses.replace(cfg, path="projected"), np.random.default_rng(0))
    won = proj.sq_error < plain.sq_error
    assert 0 < won.sum() < len(won)  # the choice really differs between rows on this layer
    np.testing.assert_array_equal(Qb, np.where(won[:, None], Qj, Qp))
    np.testing.assert_array_equal(best.sq_error, np.minimum(plain.sq_error, proj.sq_error))
    assert best.form_row.tolist() == np.where(won, "projected", "plain").tolist()


@pytest.mark.parametrize("name, cfg", [("spfq", QuantConfig(bits=4)), ("spfq", QuantConfig(bits=3, refit_scale=True)),
                                       ("gptq", QuantConfig(bits=4)), ("rtn", QuantConfig(bits=4)),
                                       ("spfq", QuantConfig(bits=4, perfect_alignment=True, path="plain"))])
def test_methods_on_weight_form_grams_match_the_full_grams(name, cfg):
    """Grams holding only W G^T and w^T F w (gram.Grams' weight form) give the methods that do not read G the
    same result as the full Grams, to rounding: the same codes on all but a rare tie, the same steps and errors."""
    W, X, Xt, full = _random_layer(seed=3, m=400, n0=48, n1=16)
    lean = Grams.from_data(X, Xt, weight=W)
    assert lean.G is None and lean.F is None
    assert not CompressConfig(method=name, quant=cfg).reads_cross_gram
    Q1, a = METHODS[name](W, full, cfg, np.random.default_rng(0))
    Q2, b = METHODS[name](W, lean, cfg, np.random.default_rng(0))
    assert np.mean(a.codes == b.codes) >= 0.99
    np.testing.assert_allclose(b.scale, a.scale, rtol=1e-9)
    np.testing.assert_allclose(b.sq_error, layer_error(W, Q2, full)[0], rtol=1e-9)
    np.testing.assert_allclose(b.sq_error.sum(), a.sq_error.sum(), rtol=1e-6)


def test_plain_path_refuses_weight_form_grams():
    """The plain path's kernels read G itself: handed weight-form Grams, a method says so instead of guessing."""
    W, X, Xt, _ = _random_layer(seed=4)
    lean = Grams.from_data(X, Xt, weight=W)
    for name, cfg in [("gpfq", QuantConfig(bits=4)), ("spfq", QuantConfig(bits=4, path="plain"))]:
        with pytest.raises(OnnxspfqError, match="reads G"):
            METHODS[name](W, lean, cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="built for another weight"):
        spfq(W[:4], lean, QuantConfig(bits=4), np.random.default_rng(0))


@pytest.mark.parametrize("name, cfg", [("spfq", QuantConfig(bits=4)), ("spfq", QuantConfig(bits=3)),
                                       ("gptq", QuantConfig(bits=4)), ("rtn", QuantConfig(bits=4)),
                                       ("spfq", QuantConfig(bits=4, refit_scale=True))])
def test_stacked_one_row_problems_equal_one_call_each(name, cfg):
    """Grams.stack (a depthwise Conv's one-row groups, each with its own Grams) in one method call gives every row
    what a call on that row's own Grams gives: the same codes and steps (to rounding), the same exact errors; a
    group whose inputs are all zero and a dead input column included."""
    rng = np.random.default_rng(7)
    grams, Ws = [], []
    for g in range(12):
        X = rng.standard_normal((300, 9)) * rng.uniform(0.1, 3.0)
        Xt = X + 0.05 * rng.standard_normal(X.shape)
        if g == 2:
            X[:], Xt[:] = 0.0, 0.0
        if g == 5:
            X[:, 4], Xt[:, 4] = 0.0, 0.0
        Ws.append(rng.standard_normal((1, 9)))
        grams.append(Grams.from_data(X, Xt, weight=Ws[-1]))
    one = [METHODS[name](w, g, cfg, np.random.default_rng(0)) for w, g in zip(Ws, grams)]
    Q, info = METHODS[name](np.concatenate(Ws), Grams.stack(grams), cfg, np.random.default_rng(0))
    np.testing.assert_array_equal(info.codes, np.concatenate([r[1].codes for r in one]))
    np.testing.assert_allclose(info.scale, np.concatenate([r[1].scale for r in one]), rtol=1e-12)
    np.testing.assert_allclose(Q, np.concatenate([r[0] for r in one]), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(info.sq_error, np.concatenate([r[1].sq_error for r in one]), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="one row each"):
        Grams.stack([Grams.from_data(np.ones((5, 9)), weight=np.ones((2, 9)))] * 2)


@pytest.mark.parametrize("n", [7, 128, 129, 300])
def test_inv_lower_is_the_inverse_of_a_lower_factor(n):
    """inv_lower (by halves, GEMMs) equals np.linalg.inv on a Cholesky factor to rounding, one and stacked, with
    exact zeros above the diagonal (the projected path's U is read from it)."""
    from onnxspfq.methods import inv_lower
    rng = np.random.default_rng(n)
    A = rng.standard_normal((3, n, 2 * n))
    L = np.linalg.cholesky(A @ A.transpose(0, 2, 1) / n + 0.01 * np.eye(n))
    got = inv_lower(L)
    ref = np.linalg.inv(L)
    assert np.abs(got - np.tril(ref)).max() <= 1e-12 * np.abs(ref).max()
    assert not np.triu(got, 1).any()
    np.testing.assert_array_equal(inv_lower(L[1]), got[1])
    np.testing.assert_allclose(got[0] @ L[0], np.eye(n), atol=1e-9)


def test_layers_reading_one_grams_share_its_factorisation(monkeypatch):
    """Q, K and V read one Grams (the capture builds one per distinct input): what the methods derive from H alone
    (prepare's symmetrised, act-ordered H; the projected path's factor U) is computed once for the three, the
    results equal those on fresh Grams byte for byte, and folding more rows into the Grams drops it."""
    from onnxspfq import methods as M

    calls = []
    real = M._upper_factor
    monkeypatch.setattr(M, "_upper_factor", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 48))
    Xt = X + 0.05 * rng.standard_normal(X.shape)
    shared = Grams.from_data(X, Xt)
    for _ in range(3):
        W = rng.standard_normal((32, 48))
        Q1, r1 = M.spfq(W, shared, QuantConfig(bits=4), np.random.default_rng(0))
        Q2, r2 = M.spfq(W, Grams.from_data(X, Xt), QuantConfig(bits=4), np.random.default_rng(0))
        assert np.array_equal(Q1, Q2) and np.array_equal(r1.sq_error, r2.sq_error)
    assert len(calls) == 1 + 3
    assert shared.memo
    shared.add(X[:10], Xt[:10])
    assert not shared.memo
