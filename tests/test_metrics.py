"""Recall and MRR on hand-computed cases, short result lists included."""
import pytest

from moonsearch.eval.metrics import first_hit_ranks, mrr_at, recall_at, summarize


def test_a_miss_in_a_short_list_is_a_miss():
    # query 0 hits at rank 3; query 1 misses in a 1-long list; query 2 gets an empty list
    ranks = first_hit_ranks([["a", "b", "c", "x"], ["b"], []], [{"x"}, {"x"}, {"x"}])
    assert recall_at(ranks, 5) == pytest.approx(1 / 3)
    assert recall_at(ranks, 1) == 0.0
    assert mrr_at(ranks, 10) == pytest.approx((1 / 4) / 3)


def test_summary_of_hits_at_known_ranks():
    ranked = [["x", "a"], ["a", "x"], ["a", "b", "c"]]
    row = summarize(first_hit_ranks(ranked, [{"x"}] * 3), ks=(1, 2), mrr_k=10)
    assert row["R@1"] == pytest.approx(1 / 3) and row["R@2"] == pytest.approx(2 / 3)
    assert row["MRR@10"] == pytest.approx((1 + 0.5) / 3) and row["n"] == 3
