"""Linear probes: logistic regression on frozen image embeddings (scikit-learn).

The regularisation strength ``C`` is chosen by cross-validation on the *training* embeddings
only, with folds grouped by case (images of one patient case never straddle a fold) and
stratified by label; the evaluation split is touched only for the final score.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold

log = logging.getLogger(__name__)

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0)


@dataclass
class FittedProbe:
    model: LogisticRegression
    labels: list[str]
    C: float
    cv_balanced_accuracy: float | None

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """Probabilities in the order of ``labels``."""
        probs = self.model.predict_proba(embeddings)
        order = [list(self.model.classes_).index(label) for label in self.labels]
        return probs[:, order]


def _folds(y: np.ndarray, groups: np.ndarray | None, requested: int, seed: int):
    smallest = min(np.unique(y, return_counts=True)[1])
    n_splits = min(requested, smallest)
    if n_splits < 2:
        return None
    if groups is not None and len(np.unique(groups)) >= n_splits:
        return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(
            np.zeros(len(y)), y, groups
        )
    return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)


def fit_probe(embeddings: np.ndarray, labels: Sequence[str], groups: Sequence[str] | None = None,
              Cs: Sequence[float] = DEFAULT_CS, folds: int = 5, max_iter: int = 2000, seed: int = 0) -> FittedProbe:
    y = np.asarray(labels, dtype=object)
    classes = sorted(set(y))
    if len(classes) < 2:
        raise ValueError(f"a linear probe needs at least two classes in the training split, got {classes}")
    base = LogisticRegression(max_iter=max_iter)
    splits = _folds(y, np.asarray(groups) if groups is not None else None, folds, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if splits is None or len(Cs) == 1:
            model = LogisticRegression(C=Cs[0] if len(Cs) == 1 else 1.0, max_iter=max_iter).fit(embeddings, y)
            return FittedProbe(model, classes, float(model.C), None)
        search = GridSearchCV(base, {"C": list(Cs)}, cv=list(splits), scoring="balanced_accuracy", refit=True)
        search.fit(embeddings, y)
    log.info("linear probe: C=%s (cv balanced accuracy %.3f)", search.best_params_["C"], search.best_score_)
    return FittedProbe(search.best_estimator_, classes, float(search.best_params_["C"]), float(search.best_score_))
