"""The open-set result switch: the query's log-softmax against the calibration bank (the
searcher's exactness with it on is checked in ``test_search_quality``)."""

from __future__ import annotations

import numpy as np
import pytest

from regionsearch.search.postprocess import ResultOptions, open_set_penalty


def test_open_set_penalty_is_the_querys_log_softmax_against_the_bank() -> None:
    rng = np.random.default_rng(3)
    query_cos, bank_cos = rng.uniform(-1, 1, 40), rng.uniform(-1, 1, (40, 6))
    for tau, weight in ((0.05, 1.0), (0.1, 2.0), (0.5, 0.3)):
        e = np.exp(np.c_[query_cos, bank_cos] / tau)
        naive = weight * tau * np.log(e[:, 0] / e.sum(axis=1))
        got = open_set_penalty(query_cos, bank_cos, tau, weight)
        np.testing.assert_allclose(got, naive, rtol=1e-9, atol=1e-12)
        assert (got <= 0).all()
    # A region that matches a bank text as well as the query loses more than one that does not.
    loose, tight = open_set_penalty([0.6, 0.6], [[0.6, 0.0], [0.1, 0.0]], 0.05, 1.0)
    assert loose < tight <= 0
    assert not open_set_penalty(query_cos, bank_cos, 0.05, 0.0).any()
    assert ResultOptions(open_set=1.0).filters and not ResultOptions.plain().filters
    with pytest.raises(ValueError, match="open_set_tau"):
        ResultOptions(open_set=1.0, open_set_tau=0.0)
    with pytest.raises(ValueError, match="open_set"):
        ResultOptions(open_set=-1.0)
