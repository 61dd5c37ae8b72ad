"""The training loop, shared by every method, with optional data-dependent sigma.

Data-dependent training (Alfarra et al., 2022): each training sample keeps its own sigma in
a buffer indexed by dataset index, initialised to `sigma` and warm-started every time the
sample is seen: before the method's loss, a few ascent steps of the radius surrogate
(core/sigma.py) run on the batch, the result is written back, and the method's noise uses it.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ddrs.core.noise import STREAM_TRAINING, block_seed
from ddrs.core.sigma import sigma_search
from ddrs.data import get_dataset
from ddrs.errors import CheckpointError, InputError, TrainingError
from ddrs.launch import device_for, join, leave
from ddrs.models import build_model, load_checkpoint, save_checkpoint
from ddrs.train.config import TrainConfig
from ddrs.train.distributed import all_reduce_sum, merge_sigma_buffer
from ddrs.train.methods import Method, build_method

__all__ = ["TrainConfig", "Trainer", "train"]

DD_SEARCH_BATCH = 4096  # noisy samples per forward pass of the training-time sigma search
RISING = 0.02  # a training accuracy this much above the last epoch's is rising


class Trainer:
    """One training run: `Trainer(config).run()` trains, logs and checkpoints to config.out.

    `train_set`, `test_set`: datasets of (x, label, index) items to use instead of the
    config's dataset splits (a router trains on relabelled images); `extra_meta`: more entries
    recorded in the checkpoints' meta."""

    def __init__(
        self, config: TrainConfig, *, train_set=None, test_set=None, extra_meta: dict | None = None
    ):
        self.config = config
        self.device = device_for(config.device)
        self.dist = join("nccl" if self.device.type == "cuda" else "gloo")
        self.out = Path(config.out)
        torch.manual_seed(config.seed + self.dist.rank)
        options = config.image_options if config.dataset == "imagefolder" else None
        if train_set is None:
            train_set = get_dataset(config.dataset, "train", config.data_root, options=options)
        if test_set is None:
            test_set = get_dataset(
                config.dataset, "test", config.data_root, augment=False, options=options
            )
        self.train_set, self.test_set = train_set, test_set
        self.extra_meta = dict(extra_meta or {})
        self.info = self.train_set.info
        # the samples trained on (--train-subset): the ones whose sigmas can move
        self.trained_indices = torch.tensor(
            training_subset(len(self.train_set), config.train_subset, config.seed)
        )
        self.method: Method = build_method(config.method, **config.method_settings)
        self.method.norm = config.norm
        self.model = build_model(
            config.arch, self.info.num_classes, self.info.input_shape, self.info.mean, self.info.std
        ).to(self.device)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, config.lr_step, config.lr_gamma
        )
        if not config.resume and (self.out / "last.pt").exists():
            raise InputError(
                f"{self.out} already holds a training run (last.pt); pass --resume to continue "
                "it, or choose another --out"
            )
        self.sigma_buffer = torch.full((len(self.train_set),), float(config.sigma))
        self.sigma_updates = torch.zeros(len(self.train_set), dtype=torch.int64)
        self.start_epoch, self.best_accuracy = 0, -1.0
        self.log_rows: list[dict] = []  # every epoch's log row, kept in last.pt too
        self.legacy_log = False
        self.chance_epochs = 0  # consecutive epochs at chance accuracy
        if config.init:
            self._init_from(config.init)
        if config.resume:
            self._resume()
        self.net: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)

    # -- checkpoints ---------------------------------------------------------------------
    def meta(self, epoch: int) -> dict:
        c = self.config
        return {
            "arch": c.arch,
            "dataset": c.dataset,
            "num_classes": self.info.num_classes,
            "input_shape": list(self.info.input_shape),
            "mean": list(self.info.mean),
            "std": list(self.info.std),
            "method": c.method,
            "method_settings": self.method.settings(),
            "sigma": c.sigma,
            "norm": c.norm,
            "epoch": epoch,
            "data_dependent": c.data_dependent,
            "train_config": dataclasses.asdict(c),
            "data_options": {
                "image_size": list(self.info.input_shape[1:]),
                "channels": self.info.input_shape[0],
            }
            if c.dataset == "imagefolder"
            else None,
            **self.extra_meta,
        }

    def save(self, epoch: int, is_best: bool) -> None:
        extra = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "sigma_buffer": self.sigma_buffer,
            "sigma_updates": self.sigma_updates,
            "best_accuracy": self.best_accuracy,
            "log_rows": self.log_rows,
            "chance_epochs": self.chance_epochs,
        }
        # best.pt before last.pt: last.pt is the commit point of an epoch, so a kill between
        # the two redoes the epoch on --resume (which rewrites best.pt identically) rather
        # than leaving a recorded best metric without its best.pt.
        if is_best:
            save_checkpoint(self.out / "best.pt", self.model, self.meta(epoch), **extra)
        save_checkpoint(self.out / "last.pt", self.model, self.meta(epoch), **extra)

    def _init_from(self, path: str) -> None:
        """Start from a checkpoint's weights; an output layer of another size (a router
        started from an expert: E routes, not C classes) starts fresh."""
        loaded = load_checkpoint(path, expect={"arch": self.config.arch})
        own = self.model.state_dict()
        given = loaded.model.state_dict()
        fits = {k: v for k, v in given.items() if k in own and own[k].shape == v.shape}
        fresh = sorted(set(own) - set(fits))
        if len(fits) < len(own) // 2:
            raise InputError(f"--init {path}: its weights do not fit this model ({fresh[:3]}...)")
        self.model.load_state_dict(fits, strict=False)
        if fresh:
            print(f"--init: {len(fits)} tensors from {path}; {', '.join(fresh)} start fresh")

    def _resume(self) -> None:
        path = self.out / "last.pt"
        if not path.exists():
            raise CheckpointError(f"--resume: no checkpoint at {path}")
        loaded = load_checkpoint(
            path,
            device=self.device,
            expect={
                "arch": self.config.arch,
                "dataset": self.config.dataset,
                "method": self.config.method,
            },
        )
        payload = loaded.payload
        self.model.load_state_dict(loaded.model.state_dict())
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        torch.set_rng_state(payload["rng"]["torch"])
        if payload["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
        self.sigma_buffer = payload["sigma_buffer"].clone()
        self.sigma_updates = payload["sigma_updates"].clone()
        self.best_accuracy = float(payload["best_accuracy"])
        self.legacy_log = "log_rows" not in payload  # written before logs were kept inside
        self.log_rows = [dict(row) for row in payload.get("log_rows", [])]
        self.chance_epochs = int(payload.get("chance_epochs", 0))
        self.start_epoch = int(loaded.meta["epoch"]) + 1

    # -- data ----------------------------------------------------------------------------
    def _train_loader(self, epoch: int) -> DataLoader:
        dataset = self.train_set
        if self.config.train_subset and self.config.train_subset < len(dataset):
            chosen = training_subset(len(dataset), self.config.train_subset, self.config.seed)
            dataset = Subset(dataset, chosen)
        if self.dist.enabled:
            sampler = DistributedSampler(
                dataset, self.dist.world, self.dist.rank, shuffle=True, seed=self.config.seed
            )
            sampler.set_epoch(epoch)
        else:
            generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
            sampler = RandomSampler(dataset, generator=generator)
        per_rank = max(1, self.config.batch // self.dist.world)
        return DataLoader(
            dataset,
            batch_size=per_rank,
            sampler=sampler,
            num_workers=self.config.workers,
            drop_last=False,
        )

    # -- one epoch -----------------------------------------------------------------------
    def _batch_sigma(self, x, idx, epoch: int, updated: torch.Tensor) -> torch.Tensor:
        c = self.config
        sigma = self.sigma_buffer[idx]
        due = epoch >= c.dd_start_epoch and (epoch - c.dd_start_epoch) % c.dd_every == 0
        if c.data_dependent and due:
            sigma = sigma_search(
                self.model,
                x,
                sigma,
                iterations=c.dd_iterations,
                lr=c.dd_lr,
                samples=c.dd_samples,
                seed=block_seed(c.seed, STREAM_TRAINING, epoch, 0),
                keys=idx.tolist(),
                batch=max(DD_SEARCH_BATCH, c.dd_samples),
                measure=False,
            ).sigma
            self.sigma_buffer[idx] = sigma
            updated[idx] = True
        return sigma

    def train_epoch(self, epoch: int) -> dict:
        self.net.train()
        loader = self._train_loader(epoch)
        updated = torch.zeros(len(self.train_set), dtype=torch.bool)
        sums: dict[str, float] = {}
        seen = correct = 0
        start = time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            unit="batch",
            disable=None if self.config.progress and self.dist.is_main else True,
            leave=False,
        )
        for x, y, idx in bar:
            x, y = x.to(self.device), y.to(self.device)
            sigma = self._batch_sigma(x, idx, epoch, updated).to(self.device)
            result = self.method.loss(self.net, x, y, sigma, epoch)
            if not torch.isfinite(result.loss):
                raise TrainingError(
                    f"the training loss became {result.loss.item()} in epoch {epoch + 1} "
                    f"(batch {seen // max(1, len(y)) + 1}); lower --lr (now "
                    f"{self.optimizer.param_groups[0]['lr']:g}) and start again; the last "
                    "finished epoch is kept in last.pt"
                )
            self.optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            self.optimizer.step()
            n = len(y)
            seen += n
            hard = y.argmax(1) if y.dim() > 1 else y  # a soft target's most likely class
            correct += (result.noisy_logits.argmax(1) == hard).sum().item()
            for name, value in {"loss": result.loss.item(), **result.terms}.items():
                sums[name] = sums.get(name, 0.0) + value * n
            bar.set_postfix(
                loss=f"{result.loss.item():.3f}",
                img_s=f"{seen / (time.perf_counter() - start):.0f}",
            )
        self.scheduler.step()
        names = sorted(sums)
        totals = all_reduce_sum([sums[k] for k in names] + [seen, correct], self.dist)
        seen_all = totals[-2]
        if self.config.data_dependent:
            self.sigma_buffer = merge_sigma_buffer(self.sigma_buffer, updated, self.dist)
            updated = merge_sigma_buffer(updated.float(), updated, self.dist) > 0
            self.sigma_updates += updated.long()
        row = {k: v / seen_all for k, v in zip(names, totals)}
        row["train_noisy_acc"] = totals[-1] / seen_all
        row["epoch_time"] = time.perf_counter() - start
        row["throughput"] = seen_all / row["epoch_time"]
        return row

    def _chance_note(self, row: dict) -> str:
        """A warning when training accuracy has stayed at chance, and not risen, for two
        epochs in a row (an accuracy below 1.5 x chance that gains RISING or more on the
        epoch before is a model that learns, slowly)."""
        chance = 1.0 / self.info.num_classes
        accuracy = row["train_noisy_acc"]
        before = self.log_rows[-1]["train_noisy_acc"] if self.log_rows else None
        rising = before is not None and accuracy >= before + RISING
        stuck = accuracy < 1.5 * chance and not rising
        self.chance_epochs = self.chance_epochs + 1 if stuck else 0
        if self.chance_epochs < 2:
            return ""
        return (
            f"training accuracy has stayed near chance ({accuracy:.3f}, under 1.5 x chance "
            f"{chance:.3f}, not rising) for {self.chance_epochs} epochs: the model is not "
            "learning; try a lower --lr, or a first epoch at a smaller --sigma"
        )

    def evaluate(self) -> dict:
        """Clean and noisy (one sample at the training sigma) accuracy on the test split."""
        chosen = spread_indices(len(self.test_set), self.config.eval_max)
        loader = DataLoader(Subset(self.test_set, chosen), batch_size=self.config.batch)
        self.model.eval()
        clean = noisy = 0
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        with torch.inference_mode():
            for x, y, _ in loader:
                x, y = x.to(self.device), y.to(self.device)
                clean += (self.model(x).argmax(1) == y).sum().item()
                if self.config.norm == "l1":
                    e = torch.rand(x.shape, generator=generator, device=self.device) * 2 - 1
                else:
                    e = torch.randn(x.shape, generator=generator, device=self.device)
                noisy += (self.model(x + self.config.sigma * e).argmax(1) == y).sum().item()
        return {"test_clean_acc": clean / len(chosen), "test_noisy_acc": noisy / len(chosen)}

    def run(self) -> Path:
        """Train from start_epoch to epochs; returns the path of the last checkpoint."""
        c = self.config
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.out)
        logger = EpochLog(
            self.out / "log.csv", enabled=self.dist.is_main, tensorboard=c.tensorboard
        )
        if not self.legacy_log:
            logger.rewrite(self.log_rows)  # the log is exactly the checkpoint's epochs
        finished = False
        try:
            for epoch in range(self.start_epoch, c.epochs):
                lr = self.optimizer.param_groups[0]["lr"]
                row = {"epoch": epoch + 1, "lr": lr, **self.train_epoch(epoch)}
                if self.dist.is_main:
                    row.update(self.evaluate())
                    row.update(sigma_summary(self.sigma_buffer[self.trained_indices]))
                    row["note"] = self._chance_note(row)
                    is_best = row["test_noisy_acc"] > self.best_accuracy
                    self.best_accuracy = max(self.best_accuracy, row["test_noisy_acc"])
                    self.log_rows.append(row)
                    self.save(epoch, is_best)
                    logger.write(row)
                    tqdm.write(format_row(row))
                    if row["note"]:
                        tqdm.write(f"warning: {row['note']}")
            finished = True
        finally:
            logger.close()
            leave(together=finished)
        return self.out / "last.pt"


def training_subset(total: int, size: int | None, seed: int) -> list[int]:
    """The sorted indices `--train-subset size` trains on (all when size is None or >= total);
    the rest of the training split is free for validation."""
    if size is None or size >= total:
        return list(range(total))
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:size]
    return chosen.sort().values.tolist()


def spread_indices(total: int, count: int | None) -> list[int]:
    """`count` indices spread evenly over range(total) (all if count is None): not the first
    `count`, since image folders are sorted by class."""
    count = total if count is None else min(total, count)
    return [i * total // count for i in range(count)]


SIGMA_QUANTILES = {
    "sigma_min": 0.0,
    "sigma_p10": 0.1,
    "sigma_median": 0.5,
    "sigma_p90": 0.9,
    "sigma_max": 1.0,
}


def sigma_summary(buffer: torch.Tensor) -> dict:
    """The distribution of the per-sample training sigmas (min, p10, median, p90, max); pass
    the sigmas of the samples trained on (a --train-subset leaves the others untouched)."""
    values = torch.quantile(buffer.double(), torch.tensor(list(SIGMA_QUANTILES.values())).double())
    return dict(zip(SIGMA_QUANTILES, values.tolist()))


def remove_stale_temp_files(out: Path) -> None:
    """Delete the temporary files of checkpoint writes that a kill interrupted."""
    for stale in out.glob(".*.pt.*.tmp"):
        stale.unlink(missing_ok=True)


def format_row(row: dict) -> str:
    keys = [
        "epoch",
        "loss",
        "train_noisy_acc",
        "test_clean_acc",
        "test_noisy_acc",
        "sigma_median",
        "epoch_time",
    ]
    return "  ".join(f"{k}={row[k]:.4g}" for k in keys if k in row)


class EpochLog:
    """Per-epoch CSV log (appends on resume), and TensorBoard scalars when asked for."""

    def __init__(self, path: Path, enabled: bool, tensorboard: bool = False):
        self.path, self.enabled, self.writer = path, enabled, None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise InputError(
                    "--tensorboard needs the tensorboard package (pip install tensorboard)"
                ) from error
            self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def rewrite(self, rows: list[dict]) -> None:
        """Replace the CSV by `rows` (on start and resume: the checkpoint's own epochs)."""
        if not self.enabled:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            if rows:
                writer = csv.DictWriter(f, fieldnames=list(rows[-1]), extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())
        if self.writer:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["epoch"])

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def train(config: TrainConfig, **datasets_and_meta) -> Path:
    """Train a model as configured; returns the path of the last checkpoint (keyword
    arguments: those of `Trainer`)."""
    return Trainer(config, **datasets_and_meta).run()
