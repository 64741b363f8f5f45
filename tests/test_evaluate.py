"""Metrics against scikit-learn as the oracle."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from lorafed.metrics import classification_scores


def test_scores_match_sklearn_including_absent_classes() -> None:
    rng = np.random.default_rng(0)
    names = ("a", "b", "c", "d", "e")
    y_true = rng.integers(0, 4, size=200)  # label "e" never occurs
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 5, size=200))
    acc, macro, report, cm = classification_scores(y_true, y_pred, names)
    assert acc == accuracy_score(y_true, y_pred)
    assert np.isclose(macro, f1_score(y_true, y_pred, average="macro"))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(5), zero_division=0)
    for i, name in enumerate(names):
        assert np.isclose(report[name]["precision"], p[i]) and np.isclose(report[name]["recall"], r[i])
        assert np.isclose(report[name]["f1"], f[i]) and report[name]["support"] == s[i]
    np.testing.assert_array_equal(np.array(cm), confusion_matrix(y_true, y_pred, labels=range(5)))
