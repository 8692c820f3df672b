"""Phase metrics: keyed once (PHASE_COLUMNS), named for the job's metric, and the best score read from them."""

import math

import pytest

from service.records import ACCURACY, PERPLEXITY, phase_best_score, phase_metrics


def test_phase_metrics_are_named_for_the_metric_and_only_declared_ones_are_taken():
    assert phase_metrics(PERPLEXITY, {"soup_{m}": 12.0, "ingredient_{ms}": [13.0, None], "cpu_seconds": 1.5}) == {
        "soup_perplexity": 12.0, "ingredient_perplexities": [13.0, None], "cpu_seconds": 1.5}
    with pytest.raises(KeyError, match="not declared in PHASE_COLUMNS"):
        phase_metrics(ACCURACY, {"soup_{m}": 0.9, "made_up": 1})


def test_the_best_score_is_the_best_finite_of_soup_and_ingredients_by_the_metrics_direction():
    m = phase_metrics(ACCURACY, {"soup_{m}": 0.91, "ingredient_{ms}": [0.93, None, math.nan]})
    assert phase_best_score(ACCURACY, m) == 0.93
    m = phase_metrics(PERPLEXITY, {"soup_{m}": 11.0, "ingredient_{ms}": [12.0, math.inf]})
    assert phase_best_score(PERPLEXITY, m) == 11.0
    assert phase_best_score(ACCURACY, {}) is None
