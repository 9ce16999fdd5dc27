"""The three merge formulas on random, non-identity adapters, against dense float64."""

import pytest
import torch

from mta.fusion import check_weights, concat_delta, merge_delta, merge_factor, merge_svd


@pytest.fixture
def factors():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 3, 10, generator=g, dtype=torch.float64)
    B = torch.randn(4, 12, 3, generator=g, dtype=torch.float64)
    return A, B


def dense(A, B):
    return torch.stack([B[i] @ A[i] for i in range(A.shape[0])])


def test_delta_is_weighted_sum_of_updates(factors):
    A, B = factors
    w = torch.tensor([0.5, -0.25, 1.5, 0.0], dtype=torch.float64)
    expect = sum(w[i] * B[i] @ A[i] for i in range(4))
    torch.testing.assert_close(merge_delta(A, B, w), expect, atol=1e-12, rtol=0)
    a, b = concat_delta(A, B, w)
    assert a.shape == (12, 10) and b.shape == (12, 12)
    torch.testing.assert_close(b @ a, expect, atol=1e-12, rtol=0)


def test_factor_is_product_of_averages_and_has_cross_terms(factors):
    A, B = factors
    w = torch.tensor([0.6, 0.4, 0.0, 0.0], dtype=torch.float64)
    a, b = merge_factor(A, B, w)
    expect = (0.6 * B[0] + 0.4 * B[1]) @ (0.6 * A[0] + 0.4 * A[1])
    torch.testing.assert_close(b @ a, expect, atol=1e-12, rtol=0)
    cross = 0.6 * 0.4 * (B[0] @ A[1] + B[1] @ A[0])
    exact = merge_delta(A, B, w)
    # factor = sum w_i^2 B_i A_i + cross terms, which is not the exact weighted sum
    torch.testing.assert_close(b @ a, 0.36 * B[0] @ A[0] + 0.16 * B[1] @ A[1] + cross)
    assert (b @ a - exact).abs().max() > 1e-3


def test_svd_is_best_low_rank_approximation(factors):
    A, B = factors
    w = torch.tensor([0.3, 0.3, 0.2, 0.2], dtype=torch.float64)
    exact = merge_delta(A, B, w)
    u, s, vh = torch.linalg.svd(exact)
    for rank in (1, 3, 5):
        a, b = merge_svd(A, B, w, rank)
        assert a.shape == (rank, 10) and b.shape == (12, rank)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        torch.testing.assert_close(b @ a, best, atol=1e-9, rtol=0)
    a, b = merge_svd(A, B, w, 12)  # full rank of the sum (<= 10): exact, zero-padded
    torch.testing.assert_close(b @ a, exact, atol=1e-9, rtol=0)
    assert a.shape == (12, 10)


@pytest.mark.parametrize("i", range(4))
def test_one_hot_returns_the_anchor_exactly(factors, i):
    A, B = factors
    w = torch.zeros(4, dtype=torch.float64)
    w[i] = 1.0
    # exact up to the order of the float64 summation, which BLAS kernels choose per machine
    torch.testing.assert_close(merge_delta(A, B, w), torch.einsum("or,ri->oi", B[i], A[i]), atol=1e-12, rtol=0)
    a, b = merge_factor(A, B, w)
    assert torch.equal(a, A[i]) and torch.equal(b, B[i])
    a, b = concat_delta(A, B, w)
    torch.testing.assert_close(b @ a, B[i] @ A[i], atol=1e-12, rtol=0)
    a, b = merge_svd(A, B, w, 3)
    torch.testing.assert_close(b @ a, B[i] @ A[i], atol=1e-9, rtol=0)


def test_weight_validation():
    with pytest.raises(ValueError, match="must be >= 0"):
        check_weights(torch.tensor([1.5, -0.5]), "factor")
    with pytest.raises(ValueError, match="must sum to 1"):
        check_weights(torch.tensor([0.5, 0.2]), "factor")
    with pytest.raises(ValueError, match="NaN or inf"):
        check_weights(torch.tensor([float("nan"), 1.0]), "delta")
    with pytest.raises(ValueError, match="vector of 3"):
        check_weights(torch.tensor([1.0, 0.0]), "delta", 3)
    with pytest.raises(ValueError, match="merge mode"):
        check_weights(torch.tensor([1.0]), "mean")
    check_weights(torch.tensor([2.0, -1.0]), "delta")  # delta is any linear combination


def test_bad_factors_rejected(factors):
    A, B = factors
    with pytest.raises(ValueError, match="disagree"):
        merge_delta(A, B[:, :, :2], torch.ones(4, dtype=torch.float64))
    A2 = A.clone()
    A2[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        merge_delta(A2, B, torch.ones(4, dtype=torch.float64))
