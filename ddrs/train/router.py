"""A router for dual smoothing (`ddrs.core.route`): which expert should answer each input.

Labels come from the experts themselves, on training images none of them trained on. For an
image x with label y, each expert j votes on `samples` noisy copies x + s_j e (the selection
stream, keyed by the image's index); expert j is *right* if its top class is y, and its score
is the radius CERTIFY would give at the certification's N and alpha. The label is the right
expert with the largest score (ties: the smaller sigma).

An image no expert gets right is labelled with the expert whose votes give y the largest
share (ties: the smaller sigma), the expert nearest to right. Why not drop such images: the
router meets them at test time too, and a router that never saw them would route them
arbitrarily, which makes its votes on the images around them less consistent, hence its
certified radius smaller; labelling them keeps the router's training inputs distributed as
its test inputs are, and where no expert is right the route costs nothing.

The router is then trained like any model (`train/loop.py`), with Gaussian augmentation at
its own sigma_r, on those images and labels. Its checkpoint records the experts (names, in
its class order) and sigma_r.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ddrs.core.experts import Experts
from ddrs.core.route import expert_scores
from ddrs.core.smooth import DEFAULTS
from ddrs.data import DatasetInfo, get_dataset
from ddrs.errors import InputError
from ddrs.models import load_checkpoint
from ddrs.results import ResultsWriter, read_table
from ddrs.train.config import TrainConfig
from ddrs.train.loop import train, training_subset

LABEL_COLUMNS = ("idx", "label", "route", "expert", "right", "score")


def held_out_indices(experts: Experts, total: int) -> list[int]:
    """The training-split indices none of the experts trained on (from their checkpoints'
    training settings: --train-subset and --seed)."""
    used: set[int] = set()
    for expert in experts:
        try:
            config = load_checkpoint(expert.source).meta.get("train_config")
        except Exception:
            config = None
        if not config:
            raise InputError(
                f"cannot tell which images expert {expert.name} trained on (not a ddrs "
                "checkpoint); give the router's images explicitly"
            )
        used |= set(training_subset(total, config.get("train_subset"), config.get("seed", 0)))
    held_out = [i for i in range(total) if i not in used]
    if not held_out:
        raise InputError(
            "the experts trained on every training image, so none is left for the router; "
            "train the experts with --train-subset"
        )
    return held_out


def label_routes(
    share_of_label: np.ndarray,
    top: np.ndarray,
    score: np.ndarray,
    y: np.ndarray,
    sigmas: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """(route, number of right experts) per image, from every expert's top class `top`, score
    and share of votes for the true label (all (B, E)); see the module's docstring."""
    order = np.array(sorted(range(len(sigmas)), key=lambda j: (sigmas[j], j)))
    right = top[:, order] == y[:, None]
    ranked = np.where(right, score[:, order], -1.0)
    nearest = share_of_label[:, order]
    best = np.where(right.any(axis=1), np.argmax(ranked, axis=1), np.argmax(nearest, axis=1))
    return order[best], right.sum(axis=1)


def router_labels(
    experts: Experts,
    dataset,
    indices: Sequence[int],
    out: str | Path,
    *,
    samples: int = 64,
    n: int = DEFAULTS.n,
    alpha: float = DEFAULTS.alpha,
    seed: int = 0,
    batch: int = 256,
    group: int = 64,
) -> dict[int, int]:
    """{dataset index: expert index}; written to `out` (LABEL_COLUMNS) as it goes, and
    resumed from it."""
    settings = {
        "experts": experts.describe(),
        "samples": samples,
        "n": n,
        "alpha": alpha,
        "seed": seed,
        "dataset": dataset.info.name,
    }
    sigmas = [e.sigma for e in experts]
    with ResultsWriter(out, LABEL_COLUMNS, settings) as writer:
        todo = [i for i in indices if i not in writer.done]
        for lo in range(0, len(todo), group):
            chunk = todo[lo : lo + group]
            items = [dataset[i] for i in chunk]
            x = torch.stack([item[0] for item in items])
            y = np.array([int(item[1]) for item in items])
            share, top, score, votes = expert_scores(
                experts,
                x,
                samples=samples,
                n=n,
                alpha=alpha,
                seed=seed,
                keys=chunk,
                batch=batch,
                with_votes=True,
            )
            of_label = votes[np.arange(len(chunk)), :, y] / samples
            route, right = label_routes(of_label, top, score, y, sigmas)
            for k, idx in enumerate(chunk):
                writer.write(
                    {
                        "idx": idx,
                        "label": int(y[k]),
                        "route": int(route[k]),
                        "expert": experts[int(route[k])].name,
                        "right": int(right[k]),
                        "score": float(score[k, route[k]]),
                    }
                )
    table = read_table(out, required=LABEL_COLUMNS)
    return dict(zip(table["idx"].tolist(), table["route"].tolist()))


class RoutedImages:
    """Images of a dataset labelled with their routes: item k is (x, route, k)."""

    def __init__(self, base, indices: Sequence[int], routes: dict[int, int], names):
        self.base, self.indices = base, list(indices)
        self.targets = [int(routes[i]) for i in self.indices]
        info = base.info
        self.info = DatasetInfo(
            f"{info.name}-routes", len(names), info.input_shape, info.mean, info.std, tuple(names)
        )
        self.split = f"router images of {info.name} {base.split}"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        x, _, _ = self.base[self.indices[k]]
        return x, self.targets[k], k


def train_router(
    experts: Experts,
    config: TrainConfig,
    indices: Sequence[int] | None = None,
    *,
    samples: int = 64,
    n: int = DEFAULTS.n,
    alpha: float = DEFAULTS.alpha,
    eval_share: float = 0.1,
    batch: int = 256,
    labels: str | Path | None = None,
) -> Path:
    """Label `indices` of the training split (default: every image no expert trained on) and
    train a router on them at sigma_r = config.sigma; `eval_share` of the images (spread
    evenly) are kept for the per-epoch accuracy instead. `labels`: the labels file (default
    OUT/labels.tsv; routers of the same experts at other sigma_r can share one). Returns the
    last checkpoint."""
    plain = get_dataset(config.dataset, "train", config.data_root, augment=False)
    if indices is None:
        indices = held_out_indices(experts, len(plain))
    indices = sorted(int(i) for i in indices)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    routes = router_labels(
        experts,
        plain,
        indices,
        labels or out / "labels.tsv",
        samples=samples,
        n=n,
        alpha=alpha,
        seed=config.seed,
        batch=batch,
    )
    step = max(2, round(1 / eval_share)) if eval_share > 0 else len(indices) + 1
    held = indices[step // 2 :: step]
    fit = [i for i in indices if i not in set(held)] or indices
    augmented = get_dataset(config.dataset, "train", config.data_root)
    names = experts.names
    shares = np.bincount([routes[i] for i in indices], minlength=len(names)) / len(indices)
    meta = {
        "router": {
            "experts": list(names),
            "sigma": config.sigma,
            "label_shares": shares.tolist(),
            "images": len(indices),
        }
    }
    return train(
        config,
        train_set=RoutedImages(augmented, fit, routes, names),
        test_set=RoutedImages(plain, held or fit, routes, names),
        extra_meta=meta,
    )
