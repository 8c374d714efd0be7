"""Activation clustering (Chen et al. 2018, "Detecting backdoor attacks on deep neural
networks by activation clustering"), as Weng et al. §4.2 run it.

An auxiliary network is trained on the whole poisoned training set. For each inspected label,
the last-hidden-layer activations of its images are reduced to 10 dimensions by independent
component analysis (Chen et al. §4: ICA to 10 components; ``reduction=pca`` is the variant
IBM's ART and BackdoorBench's ``defense/AC/ac.py`` offer) and split by 2-means; a cluster
holding at most ``size_threshold`` (0.35, Chen et al.'s relative-size criterion, ART's
default) of the label's images is flagged as poisoned and removed. scikit-learn provides ICA,
PCA and k-means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bdat_ray.data.dataset import ImageData
from bdat_ray.defenses.base import Defense, pooled_features
from bdat_ray.defenses.spectral import AuxiliarySection, auxiliary_model, inspected_labels
from bdat_ray.options import option, within


@dataclass(frozen=True)
class ActivationClusteringSection(AuxiliarySection):
    reduction: str = option(
        "ica", "dimensionality reduction before 2-means (Chen et al.: ICA)", choices=("ica", "pca")
    )
    dims: int = option(10, "dimensions after reduction (Chen et al.: 10)", check=within(1, 4096))
    size_threshold: float = option(
        0.35,
        "a cluster with at most this share of its label's images is flagged (Chen et al.'s "
        "relative size; IBM ART default 0.35)",
        check=within(0, 0.5),
    )


def smaller_cluster(
    features: np.ndarray, cfg: ActivationClusteringSection, seed: int
) -> np.ndarray:
    """Boolean mask of the members of the smaller of two k-means clusters when it holds at
    most ``cfg.size_threshold`` of the images; all False otherwise."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA, FastICA

    dims = min(cfg.dims, features.shape[1], len(features) - 1)
    if cfg.reduction == "ica":
        reducer = FastICA(
            n_components=dims, random_state=seed, max_iter=1000, whiten="unit-variance"
        )
    else:
        reducer = PCA(n_components=dims, random_state=seed)
    reduced = reducer.fit_transform(features - features.mean(0))
    assign = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)
    smaller = int(np.bincount(assign, minlength=2).argmin())
    mask = assign == smaller
    return mask if mask.mean() <= cfg.size_threshold else np.zeros_like(mask)


class ActivationClustering(Defense):
    name = "activation_clustering"
    stage = "filter"
    section = ActivationClusteringSection
    paper = "Chen et al. 2018; Weng et al. §4.2, Table 9(b)"

    def filter(self, train: ImageData) -> torch.Tensor:
        model = auxiliary_model(self, train)
        labels = train.y_train.cpu()
        removed = []
        for label in inspected_labels(self.cfg.classes, self.ctx.target, self.ctx.num_classes):
            members = (labels == label).nonzero().flatten()
            if len(members) <= self.cfg.dims:
                continue
            feats = pooled_features(model, train.x_train[members.to(train.x_train.device)])
            mask = smaller_cluster(feats.cpu().double().numpy(), self.cfg, self.ctx.seed)
            removed.append(members[torch.from_numpy(mask)])
        return torch.cat(removed).sort().values if removed else torch.empty(0, dtype=torch.long)
