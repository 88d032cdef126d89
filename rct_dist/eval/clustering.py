"""NMI of k-means clusters against the labels, the clustering metric reported next to Recall@K."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from rct_dist.eval.neighbours import check_inputs
from rct_dist.geometry import safe_normalize


def nmi(embeddings: torch.Tensor, labels: torch.Tensor, metric: str = "euclidean", seed: int = 0) -> float:
    """k-means (scikit-learn, k = number of classes, seeded so results repeat) then normalized mutual
    information. "cosine" clusters the L2-normalised rows, the geometry the retrieval uses.

    Cost grows as n x classes x dim per iteration, on the CPU: fine for CUB/Cars, minutes for SOP.
    """
    check_inputs(embeddings, labels, metric)
    x = embeddings.detach().float()
    if metric == "cosine":
        x = safe_normalize(x, dim=1)
    y = labels.cpu().numpy()
    clusters = KMeans(n_clusters=len(np.unique(y)), n_init=1, random_state=seed).fit_predict(x.cpu().numpy())
    return float(normalized_mutual_info_score(y, clusters))
