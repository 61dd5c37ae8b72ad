"""A router for dual smoothing (`ddrs.core.route`): which expert should answer each input.

Targets come from the experts themselves, on training images none of them trained on (after
Sun, Mao & Vechev's dual randomized smoothing). For an image x with label y, each expert j
votes on `samples` noisy copies x + s_j e (the selection stream, keyed by the image's
index); expert j is *right* if its top class is y, and its predicted radius R_j is the
radius CERTIFY would give at the certification's N and alpha (0 where it is wrong or would
abstain). The router learns:

* **soft targets** q = softmax(R / T) over the experts (temperature T; a small T is the hard
  label "the right expert with the largest radius", a large T spreads the mass over experts
  of similar radius, so the router is not taught a choice the votes cannot make);
* **without the images no expert certifies** (every R_j = 0): no route helps them, and a
  target for them is a guess the router would spend capacity on (the previous hard labels
  sent them to "the expert nearest to right", 30% of CIFAR-10's images, and the router learnt
  little more than the most common label). `uncertified_weight` > 0 keeps them, at that
  weight, with that nearest-to-right label;
* **class-balanced**: each image weighs 1 / (E x its hard label's share), so the most common
  route does not win by count alone;
* with Gaussian augmentation at its own sigma_r, and by default the consistency term of
  Jeong & Shin (`--method consistency`): its votes under noise agree, which is what its
  certified route radius needs. sigma_r at least the largest expert's keeps the route radius
  from capping the answer.

A weighted soft target is one vector per image, w q; the loss is the cross-entropy against
it, -sum_j w q_j log p_j, so the training methods that take class indices take it unchanged.
The router's checkpoint records the experts (names, in its class order) and sigma_r. After
training, the smoothed router is certified on its held-out images (`RouterSummary`): route
accuracy against the best expert, and the certified route radii, beside the majority-label
baseline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ddrs.core.checks import positive
from ddrs.core.experts import Experts
from ddrs.core.route import expert_scores, router_seed
from ddrs.core.smooth import ABSTAIN, DEFAULTS, Smooth
from ddrs.data import DatasetInfo, get_dataset
from ddrs.errors import InputError
from ddrs.models import load_checkpoint, recorded_meta
from ddrs.results import ResultsWriter, read_table
from ddrs.train.config import TrainConfig
from ddrs.train.loop import train, training_subset

LABEL_COLUMNS = ("idx", "label", "route", "expert", "right", "score")
ROUTER_METHODS = ("gaussian", "consistency")  # the methods that take soft targets


def check_router_method(method: str) -> None:
    if method not in ROUTER_METHODS:
        raise InputError(
            f"a router trains with --method {' or '.join(ROUTER_METHODS)} (they take its soft "
            f"targets), not {method}"
        )


def label_columns(count: int) -> tuple[str, ...]:
    """The labels file's columns: LABEL_COLUMNS and each expert's predicted radius."""
    return LABEL_COLUMNS + tuple(f"radius_{j}" for j in range(count))


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


def not_trained_on_by(denoiser: str, indices: list[int], total: int) -> list[int]:
    """`indices` without the training images a `ddrs train-denoiser` checkpoint trained on
    (a denoiser of another kind records none: all are kept)."""
    config = recorded_meta(denoiser).get("train_config") if Path(denoiser).is_file() else None
    if not config:
        return indices
    used = set(training_subset(total, config.get("train_subset"), config.get("seed", 0)))
    kept = [i for i in indices if i not in used]
    if not kept:
        raise InputError(
            f"the denoiser {denoiser} trained on every image the experts left out, so none is "
            "left for the router; train the denoiser with --train-subset"
        )
    return kept


def label_routes(
    share_of_label: np.ndarray,
    top: np.ndarray,
    score: np.ndarray,
    y: np.ndarray,
    sigmas: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """(route, number of right experts) per image, from every expert's top class `top`, score
    and share of votes for the true label (all (B, E)): the right expert with the largest
    score (ties: the smaller sigma), or, where none is right, the one nearest to right."""
    order = np.array(sorted(range(len(sigmas)), key=lambda j: (sigmas[j], j)))
    right = top[:, order] == y[:, None]
    ranked = np.where(right, score[:, order], -1.0)
    nearest = share_of_label[:, order]
    best = np.where(right.any(axis=1), np.argmax(ranked, axis=1), np.argmax(nearest, axis=1))
    return order[best], right.sum(axis=1)


@dataclass(frozen=True)
class RouteLabels:
    """What the experts say of each image: `routes` the hard label (label_routes), `radii`
    (B, E) each expert's predicted certified radius where it is right, else 0."""

    indices: list[int]
    routes: np.ndarray
    radii: np.ndarray

    @property
    def certified(self) -> np.ndarray:
        """The images some expert certifies correctly (at the labels' N and alpha)."""
        return self.radii.max(axis=1) > 0

    def shares(self, mask: np.ndarray | None = None) -> np.ndarray:
        """Each expert's share of the hard labels (of the images in `mask`)."""
        routes = self.routes if mask is None else self.routes[mask]
        return np.bincount(routes, minlength=self.radii.shape[1]) / max(1, len(routes))


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
) -> RouteLabels:
    """The experts' verdict on each image of `indices`; written to `out` (label_columns) as
    it goes, and resumed from it."""
    settings = {
        "experts": experts.describe(),
        "samples": samples,
        "n": n,
        "alpha": alpha,
        "seed": seed,
        "dataset": dataset.info.name,
    }
    sigmas = [e.sigma for e in experts]
    columns = label_columns(len(experts))
    with ResultsWriter(out, columns, settings) as writer:
        todo = [i for i in indices if i not in writer.done]
        for lo in range(0, len(todo), group):
            chunk = todo[lo : lo + group]
            items = [dataset[i] for i in chunk]
            x = torch.stack([item[0] for item in items])
            y = np.array([int(item[1]) for item in items])
            _, top, score, votes = expert_scores(
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
            radii = np.where(top == y[:, None], score, 0.0)
            for k, idx in enumerate(chunk):
                writer.write(
                    {
                        "idx": idx,
                        "label": int(y[k]),
                        "route": int(route[k]),
                        "expert": experts[int(route[k])].name,
                        "right": int(right[k]),
                        "score": float(score[k, route[k]]),
                        **{f"radius_{j}": float(radii[k, j]) for j in range(len(experts))},
                    }
                )
    table = read_table(out, required=columns)
    position = {int(idx): row for row, idx in enumerate(table["idx"].tolist())}
    rows = [position[int(i)] for i in indices]
    radii = np.stack([table[f"radius_{j}"] for j in range(len(experts))], axis=1)
    return RouteLabels(list(indices), table["route"][rows].astype(int), radii[rows])


def soft_targets(radii: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(radii / temperature) over the experts, per image (B, E)."""
    if not temperature > 0:
        raise InputError(f"--temperature must be positive, got {temperature}")
    z = np.asarray(radii, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def training_targets(
    labels: RouteLabels,
    *,
    temperature: float = 0.1,
    uncertified_weight: float = 0.0,
    balance: bool = True,
) -> np.ndarray:
    """Each image's weighted soft target w q (B, E) (see the module's docstring); a row of
    zeros is an image left out."""
    count = labels.radii.shape[1]
    targets = soft_targets(labels.radii, temperature)
    uncertified = ~labels.certified
    targets[uncertified] = np.eye(count)[labels.routes[uncertified]] * uncertified_weight
    kept = targets.sum(axis=1) > 0
    if balance and kept.any():
        hard = targets.argmax(axis=1)
        counts = np.bincount(hard[kept], minlength=count)
        present = np.count_nonzero(counts)
        weight = np.where(counts > 0, kept.sum() / (present * np.maximum(counts, 1)), 0.0)
        targets *= weight[hard][:, None]
    return targets.astype(np.float32)


class RoutedImages:
    """Images of a dataset with their routes: item k is (x, target, k); a target is a
    weighted soft target (E,) (`targets` (B, E)) or the hard route (`routes` (B,))."""

    def __init__(self, base, indices: Sequence[int], names, *, targets=None, routes=None):
        self.base, self.indices = base, list(indices)
        self.targets = targets if targets is not None else [int(r) for r in routes]
        info = base.info
        self.info = DatasetInfo(
            f"{info.name}-routes", len(names), info.input_shape, info.mean, info.std, tuple(names)
        )
        self.split = f"router images of {info.name} {base.split}"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        x, _, _ = self.base[self.indices[k]]
        target = self.targets[k]
        return x, torch.from_numpy(target) if isinstance(target, np.ndarray) else target, k


@dataclass(frozen=True)
class RouterOptions:
    """How a router learns from the labels (see the module's docstring)."""

    temperature: float = 0.1
    uncertified_weight: float = 0.0
    balance: bool = True
    eval_share: float = 0.1  # of the images, spread evenly, kept for accuracy and the summary
    check_n: int = 1000  # the summary's CERTIFY N for the router (0: no summary)


def train_router(
    experts: Experts,
    config: TrainConfig,
    indices: Sequence[int] | None = None,
    *,
    samples: int = 64,
    n: int = DEFAULTS.n,
    alpha: float = DEFAULTS.alpha,
    options: RouterOptions = RouterOptions(),
    batch: int = 256,
    labels: str | Path | None = None,
) -> Path:
    """Label `indices` of the training split (default: every image no expert trained on) and
    train a router on them at sigma_r = config.sigma; `options.eval_share` of the images
    (spread evenly) are kept out of training, for the per-epoch accuracy and the summary.
    `labels`: the labels file (default OUT/labels.tsv; routers of the same experts at other
    sigma_r can share one). Returns the last checkpoint."""
    check_router_method(config.method)
    positive("--sigma (the router's sigma_r)", config.sigma)
    plain = get_dataset(config.dataset, "train", config.data_root, augment=False)
    if indices is None:
        indices = held_out_indices(experts, len(plain))
    indices = sorted(int(i) for i in indices)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    verdict = router_labels(
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
    targets = training_targets(
        verdict,
        temperature=options.temperature,
        uncertified_weight=options.uncertified_weight,
        balance=options.balance,
    )
    held, fit = split_held(len(indices), options.eval_share)
    fit = [k for k in fit if targets[k].sum() > 0]
    if not fit:
        raise InputError(
            "no expert certifies any of the router's training images, so there is nothing to "
            "learn; use more images, or keep them with --uncertified-weight"
        )
    held = [k for k in held if verdict.certified[k]] or held
    names = experts.names
    certified = verdict.certified
    meta = {
        "router": {
            "experts": list(names),
            "sigma": config.sigma,
            "label_shares": verdict.shares(certified).tolist(),
            "images": len(indices),
            "certified_images": int(certified.sum()),
            "trained_on": len(fit),
            "options": asdict(options),
        }
    }
    print(
        f"router labels: {len(indices)} images, {int(certified.sum())} certified by some expert "
        f"({certified.mean():.1%}); {len(indices) - int(certified.sum())} no expert certifies "
        + ("(left out)" if options.uncertified_weight == 0 else "(kept at a lower weight)")
        + "; best expert's share: "
        + ", ".join(f"{e} {s:.1%}" for e, s in zip(names, verdict.shares(certified)))
    )
    augmented = get_dataset(config.dataset, "train", config.data_root)
    path = train(
        config,
        train_set=RoutedImages(augmented, [indices[k] for k in fit], names, targets=targets[fit]),
        test_set=RoutedImages(
            plain, [indices[k] for k in held], names, routes=verdict.routes[held]
        ),
        extra_meta=meta,
    )
    if options.check_n:
        summary = summarize_router(
            path, plain, [indices[k] for k in held], verdict.routes[held], n=options.check_n
        )
        (out / "router-summary.json").write_text(json.dumps(asdict(summary), indent=1) + "\n")
        print(summary.describe())
    return path


def split_held(count: int, share: float) -> tuple[list[int], list[int]]:
    """(held, fit) positions: every (1/share)-th image held out, the others to train on."""
    if share <= 0:
        return [], list(range(count))
    step = max(2, round(1 / share))
    held = list(range(step // 2, count, step))
    return held, [k for k in range(count) if k not in set(held)] or list(range(count))


@dataclass(frozen=True)
class RouterSummary:
    """The smoothed router on its held-out images: how often its certified route is the best
    expert, and its route radii, against always answering the most common route."""

    images: int
    sigma_r: float
    n: int
    alpha: float
    route_accuracy: float  # smoothed router's route = the best expert (abstain: wrong)
    majority_accuracy: float  # always the most common best expert
    abstain: float
    route_radius_quantiles: dict  # over all held images (0 where it abstains)

    def describe(self) -> str:
        q = self.route_radius_quantiles
        return (
            f"router on {self.images} held-out images (CERTIFY at sigma_r {self.sigma_r:g}, "
            f"N {self.n}, alpha {self.alpha:g}): route accuracy {self.route_accuracy:.3f} "
            f"against {self.majority_accuracy:.3f} for always the most common route; "
            f"abstains {self.abstain:.1%}; certified route radius "
            + ", ".join(f"{k} {v:.3f}" for k, v in q.items())
        )


def summarize_router(
    path: Path,
    dataset,
    indices: Sequence[int],
    routes: np.ndarray,
    *,
    n: int = 1000,
    n0: int = DEFAULTS.n0,
    alpha: float = DEFAULTS.alpha,
    batch: int | None = None,
) -> RouterSummary:
    """The RouterSummary of the router checkpoint at `path` on these images."""
    loaded = load_checkpoint(path)
    sigma_r = float(loaded.meta["router"]["sigma"])
    count = len(loaded.meta["router"]["experts"])
    smooth = Smooth(loaded.model, count, seed=router_seed(loaded.meta["train_config"]["seed"]))
    found = []
    for lo in range(0, len(indices), 64):
        chunk = list(indices[lo : lo + 64])
        x = torch.stack([dataset[i][0] for i in chunk])
        found += smooth.certify_batch(x, sigma_r, n0, n, alpha, batch, keys=chunk)
    predicted = np.array([c.predict for c in found])
    radius = np.array([c.radius for c in found])
    majority = np.bincount(routes, minlength=count).max() / max(1, len(routes))
    quantiles = {f"p{q}": float(np.percentile(radius, q)) for q in (10, 25, 50, 75, 90)}
    return RouterSummary(
        images=len(indices),
        sigma_r=sigma_r,
        n=n,
        alpha=alpha,
        route_accuracy=float(np.mean(predicted == routes)),
        majority_accuracy=float(majority),
        abstain=float(np.mean(predicted == ABSTAIN)),
        route_radius_quantiles=quantiles,
    )
