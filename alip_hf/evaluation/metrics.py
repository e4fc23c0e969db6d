"""Metrics as pure functions of features: top-k accuracy, mean per-class recall, retrieval recall (one
routine for recall@k and the recall curve), and the linear probe."""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from alip_hf.evaluation.presets import RECALL_CURVE_MAX_K, RECALL_KS

logger = logging.getLogger(__name__)

# The linear probe's sweep of the inverse regularisation C (CLIP searched lambda = 1/C over [1e-6, 1e6]).
LINEAR_PROBE_CS = tuple(float(c) for c in np.logspace(-6, 6, 13))


# ----------------------------------------------------------------------------------------------------------------
# Metrics (pure functions of features)
# ----------------------------------------------------------------------------------------------------------------


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows of `logits (N, C)` whose label `(N,)` is among the k highest; NaN when `C < k`."""
    if logits.shape[1] < k:
        return float("nan")
    top = logits.topk(k, dim=1, largest=True, sorted=True).indices
    return int((top == labels.view(-1, 1)).any(dim=1).sum()) / len(labels)


def mean_per_class_recall(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in `labels` of the fraction of their rows predicted right (sklearn's
    `balanced_accuracy_score`, which CLIP_benchmark uses): classes without rows do not count."""
    classes = np.unique(labels)
    recalls = np.array([(predictions[labels == c] == c).mean() for c in classes], dtype=np.float64)
    return float(recalls.mean())


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor | np.ndarray, prefix: str = "") -> dict:
    """`acc1`, `acc5` (NaN with fewer than 5 classes) and `mean_per_class_recall` of `logits (N, C)`."""
    labels = torch.as_tensor(np.asarray(labels))
    if len(labels) == 0:
        raise ValueError("no samples to score")
    predictions = logits.argmax(dim=1).numpy()
    return {
        f"{prefix}acc1": topk_accuracy(logits, labels, 1),
        f"{prefix}acc5": topk_accuracy(logits, labels, 5),
        f"{prefix}mean_per_class_recall": mean_per_class_recall(predictions, labels.numpy()),
    }


def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image_index, ks=RECALL_KS) -> dict:
    """Recall@k both ways, a query counting as a hit when at least one of its matches is in its top k; tied
    candidates (duplicate captions or images) by `recall_at_ks`'s rule, whatever the row order.

    Args:
        image_embeds: `(I, D)` normalised. text_embeds: `(T, D)` normalised.
        text_image_index: `(T,)`, the image row of each text (several texts may share an image).
        ks: cut-offs; a k above the number of candidates scores every query as a hit (all are retrieved).

    Returns:
        `image_retrieval_recall@k` (text -> image, over T queries) and `text_retrieval_recall@k` (image -> text,
        over I queries), CLIP_benchmark's names.
    """
    recalls = recall_at_ks(similarity_scores(text_embeds, image_embeds), text_image_index, ks)
    return {f"{name}@{k}": recalls[name][i] for name in recalls for i, k in enumerate(ks)}


def recall_curve(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image_index,
                 max_k: int = RECALL_CURVE_MAX_K) -> dict[str, list]:
    """Recall at every k from 1 to `max_k`, or to the larger candidate count if that is smaller (where every
    query is a hit both ways).

    Args:
        image_embeds: `(I, D)` normalised. text_embeds: `(T, D)` normalised. text_image_index: `(T,)`.

    Returns:
        `{"k": [1, ..., K], "image_retrieval_recall": [K values], "text_retrieval_recall": [K values]}`, the
        recall at `k[i]` at index i, non-decreasing in k.
    """
    scores = similarity_scores(text_embeds, image_embeds)  # (T, I)
    ks = list(range(1, min(max_k, max(scores.shape)) + 1))
    return {"k": ks, **recall_at_ks(scores, text_image_index, ks)}


def similarity_scores(text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """`text_embeds (T, D) @ image_embeds.T (D, I)` -> `(T, I)`, bitwise equal for equal rows.

    A matrix product may round the same row differently at different positions (blocking), which would break
    the exact ties of duplicate captions or images by row position. Scoring each distinct row once (the unique
    rows, sorted, so also independent of the input order) and indexing back makes equal inputs tie exactly."""
    unique_texts, text_inverse = torch.unique(text_embeds, dim=0, return_inverse=True)
    unique_images, image_inverse = torch.unique(image_embeds, dim=0, return_inverse=True)
    return (unique_texts @ unique_images.T)[text_inverse][:, image_inverse]


def recall_at_ks(scores: torch.Tensor, text_image_index, ks) -> dict[str, list[float]]:
    """The one recall routine: text -> image and image -> text recall at each k of `ks`, from `scores (T, I)`.

    A query is a hit at k when one of its matches is among its first k candidates (every candidate, if there
    are fewer). Ties: candidates with exactly equal scores (duplicate captions give equal text embeddings, so an
    image ties with every copy of its caption) are ranked in a uniformly random order, and the recall is the
    *expected* recall under that order, computed exactly rather than sampled. So it does not depend on row
    order, and without ties it is the plain count of CLIP_benchmark (which ranks ties in `topk`'s arbitrary
    order). For a query whose best match scores s, with g non-matching candidates above s, t non-matching and m
    matching candidates at exactly s, the hit probability at k is 0 when k <= g, else
    `1 - C(t, k - g) / C(t + m, k - g)` (the chance that the first k - g of the tied candidates are all
    non-matching; 1 when k - g > t).

    Returns:
        `{"image_retrieval_recall": [one value per k], "text_retrieval_recall": [...]}`.
    """
    text_image_index = torch.as_tensor(np.asarray(text_image_index), dtype=torch.long)
    num_texts, num_images = scores.shape
    text_to_image_match = text_image_index[:, None] == torch.arange(num_images)[None, :]  # (T, I)
    return {"image_retrieval_recall": _expected_recall(scores, text_to_image_match, ks),
            "text_retrieval_recall": _expected_recall(scores.T, text_to_image_match.T, ks)}


def _expected_recall(scores: torch.Tensor, matches: torch.Tensor, ks, chunk: int = 1024) -> list[float]:
    """Mean over queries (rows of `scores (Q, C)`, `matches (Q, C)` bool) of the expected hit at each k, with
    exactly tied candidates in random order (`recall_at_ks`). Rows in chunks to bound the `(chunk, C)` masks."""
    ks_tensor = torch.as_tensor(list(ks), dtype=torch.float64)
    total = torch.zeros(len(ks_tensor), dtype=torch.float64)
    for start in range(0, scores.shape[0], chunk):
        s, match = scores[start:start + chunk], matches[start:start + chunk]
        best = s.masked_fill(~match, float("-inf")).amax(dim=1, keepdim=True)  # (q, 1); -inf: no match at all
        above = (~match & (s > best)).sum(dim=1).double()  # g
        tied_other = (~match & (s == best)).sum(dim=1).double()  # t
        tied_match = (match & (s == best)).sum(dim=1).double()  # m (0 only for a query without matches)
        j = ks_tensor[None, :] - above[:, None]  # (q, K): positions left for the tied group
        t, n = tied_other[:, None].expand_as(j), (tied_other + tied_match)[:, None].expand_as(j)
        jj = j.clamp(min=0).minimum(t)
        # C(t, j) / C(t + m, j) through log-gamma, used only where 0 < j <= t.
        log_all_other = (torch.lgamma(t + 1) - torch.lgamma(t - jj + 1)
                         - torch.lgamma(n + 1) + torch.lgamma(n - jj + 1))
        hit = torch.where(j > t, 1.0, 1.0 - log_all_other.exp())
        hit = torch.where((j <= 0) | (tied_match[:, None] == 0), 0.0, hit)
        total += hit.sum(dim=0)
    # A float32 quotient, as CLIP_benchmark's `.float().mean()`: without ties `total` is an exact hit count, so
    # the two agree to the bit.
    return (total.float() / max(scores.shape[0], 1)).tolist()


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, val_features: np.ndarray | None = None, val_labels: np.ndarray | None = None,
                 val_fraction: float = 0.2, cs: Sequence[float] = LINEAR_PROBE_CS, seed: int = 0,
                 max_iter: int = 1000, num_classes: int | None = None) -> dict:
    """Logistic regression on frozen features `(N, D)`: C swept on validation, refit on train + validation.

    The CLIP paper (appendix A.3) searches the L2 penalty over [1e-6, 1e6] on a validation split with
    L-BFGS; here the sweep is `cs` (13 log-spaced values by default) followed by a finer pass of four values
    around the best (+-0.25 and +-0.5 decades), ties going to the stronger regularisation. Without a validation
    split, a stratified `val_fraction` of the training rows is held out (seeded). CLIP_benchmark's linear probe
    instead trains a torch linear layer with a weight-decay sweep, so `lp_*` numbers are comparable in meaning
    with its, not equal to the digit.

    Returns:
        `lp_acc1`, `lp_acc5`, `lp_mean_per_class_recall` (CLIP_benchmark's names) and `lp_C`, the chosen C.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    if val_features is None:
        stratify = train_labels if np.unique(train_labels, return_counts=True)[1].min() >= 2 else None
        train_features, val_features, train_labels, val_labels = train_test_split(
            train_features, train_labels, test_size=val_fraction, random_state=seed, stratify=stratify)

    def fit(c, x, y):
        # Weakly regularised fits (large C) on separable features do not converge within max_iter; the sweep
        # scores them on validation like the others, so the warning carries no information here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(x, y)

    def val_accuracy(c):
        return float((fit(c, train_features, train_labels).predict(val_features) == val_labels).mean())

    scores = {c: val_accuracy(c) for c in tqdm(list(cs), desc="linear probe C sweep", leave=False)}
    best = max(sorted(scores), key=lambda c: scores[c])  # sorted ascending: a tie keeps the smallest C
    for c in (best * 10 ** d for d in (-0.5, -0.25, 0.25, 0.5)):
        scores[c] = val_accuracy(c)
    best = max(sorted(scores), key=lambda c: scores[c])
    classifier = fit(best, np.concatenate([train_features, val_features]), np.concatenate([train_labels, val_labels]))
    # The decision function's columns are the classes seen in training; classes never seen score -inf.
    num_classes = int(num_classes or max(classifier.classes_.max(), test_labels.max()) + 1)
    logits = np.full((len(test_features), num_classes), -np.inf)
    logits[:, classifier.classes_] = _class_scores(classifier, test_features)
    metrics = classification_metrics(torch.from_numpy(logits), test_labels, prefix="lp_")
    return {**metrics, "lp_C": best}


def _class_scores(classifier, features: np.ndarray) -> np.ndarray:
    """`(N, len(classes_))` scores; sklearn gives one score for two classes, turned into the logits (-s/2, s/2)."""
    scores = classifier.decision_function(features)
    return scores if scores.ndim == 2 else np.stack([-scores / 2, scores / 2], axis=1)




# ----------------------------------------------------------------------------------------------------------------
# DataComp's suite metrics: retrieval summary, WILDS and fairness metrics
# ----------------------------------------------------------------------------------------------------------------


def mean_recall_at_1(metrics: dict) -> float:
    """DataComp's retrieval score: the mean of image -> text and text -> image recall@1."""
    return 0.5 * (metrics["text_retrieval_recall@1"] + metrics["image_retrieval_recall@1"])


def association_jaccard(scores: torch.Tensor, is_association: torch.Tensor) -> float:
    """WinoGAViL's score of one game: the K highest-scoring candidates are the prediction, K the number of
    associations, and the score is the Jaccard index |predicted & associated| / |predicted | associated|.

    Args:
        scores: `(C,)` cue-candidate similarities. is_association: `(C,)` bool.

    Candidates with equal scores (the same image twice) are taken in their published order (a stable sort);
    DataComp's `np.argsort` leaves such ties to its sort, so the two can differ on them.
    """
    k = int(is_association.sum())
    predicted = torch.zeros_like(is_association)
    predicted[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    return float((predicted & is_association).sum()) / float((predicted | is_association).sum())


# DataComp's WinoGAViL metrics (eval_utils/wino_eval.py): the mean Jaccard index over the games with these
# numbers of candidates.
WINOGAVIL_GROUPS = {"avg_jaccard_score": (5, 6, 10, 12), "jaccard_score_5": (5,), "jaccard_score_6": (6,),
                    "jaccard_score_10": (10,), "jaccard_score_12": (12,), "jaccard_score_5-6": (5, 6),
                    "jaccard_score_10-12": (10, 12)}


def winogavil_metrics(jaccards: Sequence[float], num_candidates: Sequence[int]) -> dict[str, float]:
    """DataComp's WinoGAViL metrics from each game's Jaccard index and candidate count: `avg_jaccard_score` over
    every game, `jaccard_score_<n>` over the games with n candidates, `jaccard_score_5-6` / `_10-12` over both
    sizes (the main metric: `jaccard_score_10-12`). NaN for a group without games, as DataComp's empty mean."""
    jaccards, counts = np.asarray(jaccards, dtype=np.float64), np.asarray(num_candidates)
    metrics = {}
    for name, sizes in WINOGAVIL_GROUPS.items():
        chosen = jaccards if name == "avg_jaccard_score" else jaccards[np.isin(counts, sizes)]
        metrics[name] = float(chosen.mean()) if len(chosen) else float("nan")
    return metrics


def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 averaged over the classes present in `labels` (WILDS' `F1(average="macro")`, iWildCam's metric):
    classes that are only predicted, never true, do not count."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, predictions, average="macro", labels=np.unique(labels)))


def worst_group_accuracy(hits: np.ndarray, groups: np.ndarray) -> float:
    """The lowest accuracy over the groups that have samples: `hits (N,)` bool, `groups (N,)` group ids."""
    return float(min(hits[groups == g].mean() for g in np.unique(groups)))


def group_metric(name: str, logits: torch.Tensor, labels: np.ndarray, metadata: np.ndarray) -> float:
    """One of DataComp's WILDS / fairness metrics from `logits (N, C)`, `labels (N,)` and each image's metadata
    `(N, F)` (the `.npy` member; its first field is the group DataComp evaluates by).

    - `F1-macro_all` (iWildCam): `macro_f1` of the top-1 predictions.
    - `acc_worst_region` (FMoW): the worst top-1 accuracy over regions (field 0).
    - `acc_top5_wg` (Dollar Street): the worst top-5 accuracy over income groups (field 0).
    - `acc_wg` (GeoDE): the worst top-1 accuracy over regions (field 0).
    """
    labels = np.asarray(labels)
    if name == "F1-macro_all":
        return macro_f1(logits.argmax(dim=1).numpy(), labels)
    k = 5 if name == "acc_top5_wg" else 1
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices.numpy()
    hits = (top == labels[:, None]).any(axis=1)
    groups = np.asarray(metadata).reshape(len(labels), -1)[:, 0]
    return worst_group_accuracy(hits, groups)
