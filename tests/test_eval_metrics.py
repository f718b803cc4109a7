"""Metric math of the evaluation harness against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megacontext.errors import InputError
from megacontext.eval.metrics import (
    bootstrap_ci,
    delta_nll,
    exact_match,
    max_over_answers,
    mean_nll,
    normalize_answer,
    qa_f1,
    recovered_fraction,
)


def test_mean_and_delta_nll():
    assert mean_nll([1.0, 2.0, 4.5]) == pytest.approx(2.5)
    assert math.isnan(mean_nll([]))
    assert delta_nll(2.75, 2.5) == pytest.approx(0.25)
    assert delta_nll(2.0, 2.5) == pytest.approx(-0.5)


def test_recovered_fraction_hand_values():
    # truncation loses 0.4 nats; the method gets 0.3 of them back -> 0.75
    assert recovered_fraction(2.1, 2.4, 2.0) == pytest.approx(0.75)
    assert recovered_fraction(2.4, 2.4, 2.0) == pytest.approx(0.0)
    assert recovered_fraction(2.0, 2.4, 2.0) == pytest.approx(1.0)
    # worse than truncation -> negative
    assert recovered_fraction(2.6, 2.4, 2.0) == pytest.approx(-0.5)
    # better than full -> above 1
    assert recovered_fraction(1.9, 2.4, 2.0) == pytest.approx(1.25)


def test_recovered_fraction_undefined_cases():
    # truncation loses nothing: nothing to recover -> NaN, never inf
    assert math.isnan(recovered_fraction(2.1, 2.0, 2.0))
    assert math.isnan(recovered_fraction(2.1, 2.0005, 2.0))
    assert math.isnan(recovered_fraction(2.1, 2.009, 2.0))  # below 0.01 nats: noise
    assert math.isnan(recovered_fraction(2.1, 2.4, math.nan))
    assert math.isnan(recovered_fraction(math.nan, 2.4, 2.0))
    # truncation *better* than full by more than eps: defined (sign flips)
    assert recovered_fraction(2.0, 1.9, 2.1) == pytest.approx(0.5)  # (1.9-2.0)/(1.9-2.1)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    vals = np.random.default_rng(3).normal(0.2, 0.1, size=25)
    a = bootstrap_ci(vals, seed=7)
    b = bootstrap_ci(vals, seed=7)
    c = bootstrap_ci(vals, seed=8)
    assert a == b
    assert a != c
    point, lo, hi = a
    assert point == pytest.approx(vals.mean())
    assert lo < point < hi
    # the percentile interval of the mean is about +-1.96 sd/sqrt(n)
    se = vals.std(ddof=1) / math.sqrt(vals.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.25)


def test_bootstrap_edge_cases():
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    assert all(math.isnan(x) for x in bootstrap_ci([math.nan, math.inf]))
    assert bootstrap_ci([0.3, math.nan]) == (0.3, 0.3, 0.3)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    with pytest.raises(InputError):
        bootstrap_ci([1.0, 2.0], n_boot=0)
    with pytest.raises(InputError):
        bootstrap_ci([1.0, 2.0], alpha=1.5)


def test_normalize_answer_like_longbench():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theory") == "theory"  # articles only as whole words


def test_qa_f1_hand_values():
    assert qa_f1("the cat", "Cat.") == 1.0
    # pred {black, cat, sat}, ref {cat, sat, down, quietly}: overlap 2
    # P = 2/3, R = 2/4, F1 = 2PR/(P+R) = 4/7
    assert qa_f1("black cat sat", "cat sat down quietly") == pytest.approx(4 / 7)
    # multiset overlap: "a a b" vs "b b" after article removal "b" vs "b b": P=1, R=1/2
    assert qa_f1("x x y", "y y") == pytest.approx(2 * 1 / 3 * 1 / 2 / (1 / 3 + 1 / 2))
    assert qa_f1("", "cat") == 0.0
    assert qa_f1("dog", "cat") == 0.0


def test_exact_match_and_max_over_answers():
    assert exact_match("Paragraph 3.", "paragraph 3") == 1.0
    assert exact_match("Paragraph 3", "Paragraph 30") == 0.0
    assert max_over_answers(qa_f1, "red car", ["blue car", "red car"]) == 1.0
    assert max_over_answers(qa_f1, "red car", ["blue car"]) == pytest.approx(0.5)
    with pytest.raises(InputError):
        max_over_answers(qa_f1, "x", [])


def test_retrieval_score_like_longbench():
    from megacontext.eval.metrics import retrieval_score

    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 30", "Paragraph 3") == 0.5
    assert retrieval_score("no idea", "Paragraph 3") == 0.0
    with pytest.raises(InputError):
        retrieval_score("3", "three")
