import numpy as np
import pytest

from medpeft.metrics.multiple import METHODS, adjust_p_values


def _holm_by_definition(p):
    """Holm 1979: reject H_(1..i) while p_(j) <= alpha / (m - j + 1); the adjusted p-value of H_(i) is the
    smallest alpha at which it is rejected: max over j <= i of (m - j + 1) p_(j), capped at 1."""
    m, ranked = len(p), sorted(range(len(p)), key=lambda i: p[i])
    out = [0.0] * m
    for position, i in enumerate(ranked):
        out[i] = min(1.0, max((m - j) * p[ranked[j]] for j in range(position + 1)))
    return out


def _bh_by_definition(p):
    """Benjamini-Hochberg 1995: reject H_(1..k) for the largest k with p_(k) <= k alpha / m; the adjusted
    p-value of H_(i) is the smallest alpha at which it is rejected: min over j >= i of m p_(j) / j, capped at 1."""
    m, ranked = len(p), sorted(range(len(p)), key=lambda i: p[i])
    out = [0.0] * m
    for position, i in enumerate(ranked):
        out[i] = min(1.0, min(m * p[ranked[j]] / (j + 1) for j in range(position, m)))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_holm_and_bh_equal_the_papers_procedures_with_nan_entries_left_out(seed):
    rng = np.random.default_rng(seed)
    p = rng.random(17) ** 3
    p[3] = p[5]  # a tie
    p[[2, 11]] = np.nan
    tested = ~np.isnan(p)
    for method, reference in (("holm", _holm_by_definition), ("bh", _bh_by_definition)):
        adjusted = adjust_p_values(p, method)
        assert np.isnan(adjusted[[2, 11]]).all()
        np.testing.assert_allclose(adjusted[tested], reference(list(p[tested])), rtol=0, atol=1e-14)
        assert (adjusted[tested] >= p[tested]).all() and (adjusted[tested] <= 1).all()


def test_a_worked_example_and_the_methods_stated():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm, ascending 0.005, 0.01, 0.03, 0.04: x4 0.02, x3 0.03, x2 0.06, x1 0.04 -> running max 0.06.
    np.testing.assert_allclose(adjust_p_values(p, "holm"), [0.03, 0.06, 0.06, 0.02])
    # BH: 4p/rank = 0.02, 0.02, 0.04, 0.04 for ranks 1..4 in ascending order; running min from the top.
    np.testing.assert_allclose(adjust_p_values(p, "bh"), [0.02, 0.04, 0.04, 0.02])
    assert set(METHODS) == {"holm", "bh"}
    with pytest.raises(ValueError, match="method must be one of holm, bh, got 'bonferroni'"):
        adjust_p_values(p, "bonferroni")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        adjust_p_values([0.5, 1.2], "holm")


def test_equals_statsmodels_where_installed():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(9).random(30) ** 2
    for method, theirs in (("holm", "holm"), ("bh", "fdr_bh")):
        np.testing.assert_allclose(adjust_p_values(p, method), multitest.multipletests(p, method=theirs)[1],
                                   rtol=0, atol=1e-14)
