"""Training a denoiser for a frozen classifier (`ddrs train-denoiser`), after Salman et al.
(NeurIPS 2020), "Denoised Smoothing".

The classifier f is never changed. Objectives, on z = x + sigma e:
* `mse`: ||D(z) - x||^2, per pixel;
* `stability`: cross-entropy between f(D(z)) and f's own class on the clean x, so no labels
  are needed: the denoiser learns to give f back what f sees on clean images;
* `mse-then-stability`: MSE for the first `--mse-epochs`, then stability (their best).
With several `--sigmas` the denoiser is *blind*: each training image gets one of them at
random, so one denoiser (and one classifier) serves every sigma, e.g. as experts.

Checkpoints (OUT/last.pt, OUT/best.pt, OUT/log.csv) hold the denoiser alone; `--resume`
continues exactly. Adam (lr 1e-3) as in Salman et al.'s code.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, Subset
from tqdm import tqdm

from ddrs.core.checks import integer, number, optional_integer, positive
from ddrs.core.torchutil import frozen_eval
from ddrs.data import get_dataset
from ddrs.errors import CheckpointError, InputError, TrainingError
from ddrs.launch import device_for
from ddrs.models import (
    DENOISER_ARCHS,
    Denoised,
    build_denoiser,
    load_checkpoint,
    load_model,
    model_fingerprint,
    save_checkpoint,
)
from ddrs.models.checkpoint import is_own_model
from ddrs.models.onnx import gives_gradients
from ddrs.options import setting
from ddrs.runs.source import DATASETS_HELP
from ddrs.train.loop import (
    EpochLog,
    remove_stale_temp_files,
    spread_indices,
    training_subset,
)

OBJECTIVES = ("mse", "stability", "mse-then-stability")


@dataclass(kw_only=True)
class DenoiserConfig:
    """Everything a denoiser's training depends on; recorded in each checkpoint."""

    classifier: str = setting(
        None,
        "the frozen classifier: a checkpoint, or package.module:factory / TorchScript",
        required=True,
    )
    dataset: str = setting(None, DATASETS_HELP, required=True)
    out: str = setting(None, "run folder: last.pt, best.pt, log.csv", required=True)
    sigmas: str = setting(
        None,
        "the noise level (pixel units), or several, comma separated, for a blind denoiser",
        required=True,
        aliases=("--sigma",),
    )
    objective: str = setting("stability", "training objective", choices=list(OBJECTIVES))
    mse_epochs: int | None = setting(
        None, "mse-then-stability: epochs of MSE first (default: half of --epochs)", type=int
    )
    arch: str = setting(
        "dncnn",
        "dncnn (Salman et al.: 17 layers, 64 channels) or dncnn_small (5 layers, 16 "
        "channels: for CPUs)",
        choices=list(DENOISER_ARCHS),
    )
    epochs: int = setting(20, "training epochs")
    batch: int = setting(128, "training batch size")
    lr: float = setting(1e-3, "Adam learning rate")
    lr_step: int = setting(10, "multiply lr by --lr-gamma every this many epochs")
    lr_gamma: float = setting(0.1, "lr factor every --lr-step")
    seed: int = setting(0, "seed of initialisation, order, noise")
    data_root: str | None = setting(
        None, "dataset folder, or the .npz file (default: $DDRS_DATA_ROOT)"
    )
    train_subset: int | None = setting(
        None, "train on a fixed random subset of this size", type=int
    )
    eval_max: int | None = setting(1000, "test inputs for per-epoch accuracy", type=int)
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    resume: bool = setting(False, "continue from OUT/last.pt exactly")
    progress: bool = setting(True, "hide progress bars", flag="--no-progress")

    def __post_init__(self) -> None:
        _ = self.noise_levels  # checks them
        for name in ("epochs", "batch", "lr_step"):
            integer(f"--{name.replace('_', '-')}", getattr(self, name))
        positive("--lr", self.lr)
        number("--lr-gamma", self.lr_gamma)
        optional_integer("--train-subset", self.train_subset)
        optional_integer("--eval-max", self.eval_max)
        if self.mse_epochs is not None:
            integer("--mse-epochs", self.mse_epochs, minimum=0)
            if self.objective != "mse-then-stability":
                raise InputError("--mse-epochs belongs to --objective mse-then-stability")
        if self.arch not in DENOISER_ARCHS:
            raise InputError(f"--arch {self.arch}: choose one of {', '.join(DENOISER_ARCHS)}")

    @property
    def noise_levels(self) -> tuple[float, ...]:
        try:
            levels = tuple(float(s) for s in str(self.sigmas).split(","))
        except ValueError:
            raise InputError(
                f"--sigmas {self.sigmas!r}: expected a number or numbers separated by commas "
                "(e.g. 0.25, or 0.12,0.25,0.5)"
            ) from None
        return tuple(positive("--sigmas", s) for s in levels)

    @property
    def stability_from(self) -> int:
        """The first epoch (0-based) trained for stability."""
        if self.objective == "mse":
            return self.epochs
        if self.objective == "stability":
            return 0
        return self.epochs // 2 if self.mse_epochs is None else self.mse_epochs


def denoiser_loss(
    denoiser: nn.Module, classifier: nn.Module, x: Tensor, sigma: Tensor, stability: bool
) -> tuple[Tensor, Tensor]:
    """(the objective on one batch, the classifier's logits on the denoised noisy batch)."""
    z = x + sigma.view(-1, *([1] * (x.dim() - 1))) * torch.randn_like(x)
    denoised = denoiser(z)
    if not stability:  # f only watches (an ONNX classifier gives no gradients)
        with torch.no_grad():
            logits = classifier(denoised.detach())
        return F.mse_loss(denoised, x), logits
    with torch.no_grad():
        own_class = classifier(x).argmax(1)
    logits = classifier(denoised)
    return F.cross_entropy(logits, own_class), logits


class DenoiserTrainer:
    """`DenoiserTrainer(config).run()` trains, logs and checkpoints to config.out."""

    def __init__(self, config: DenoiserConfig):
        self.config = config
        self.device = device_for(config.device)
        self.out = Path(config.out)
        if not config.resume and (self.out / "last.pt").exists():
            raise InputError(
                f"{self.out} already holds a training run (last.pt); pass --resume to continue "
                "it, or choose another --out"
            )
        torch.manual_seed(config.seed)
        self.train_set = get_dataset(config.dataset, "train", config.data_root)
        self.test_set = get_dataset(config.dataset, "test", config.data_root, augment=False)
        self.info = self.train_set.info
        self.classifier = self._classifier()
        self.denoiser = build_denoiser(config.arch, self.info.input_shape).to(self.device)
        self.sigmas = torch.tensor(config.noise_levels)
        self.optimizer = torch.optim.Adam(self.denoiser.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, config.lr_step, config.lr_gamma
        )
        self.start_epoch, self.best_accuracy, self.log_rows = 0, -1.0, []
        if config.resume:
            self._resume()

    def _classifier(self) -> nn.Module:
        c = self.config
        model = load_model(
            **{"model" if is_own_model(c.classifier) else "checkpoint": c.classifier},
            num_classes=self.info.num_classes,
            input_shape=self.info.input_shape,
            inputs_name=c.dataset,
            device=self.device,
        )
        if c.stability_from < c.epochs and not gives_gradients(model):
            raise InputError(
                f"--objective {c.objective} trains through the classifier's gradients, which "
                "an ONNX classifier does not give: use --objective mse, or the torch model"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    def meta(self, epoch: int) -> dict:
        c = self.config
        channels = self.info.input_shape[0]
        return {
            "kind": "denoiser",
            "arch": c.arch,
            "dataset": c.dataset,
            "num_classes": self.info.num_classes,
            "input_shape": list(self.info.input_shape),
            "mean": [0.0] * channels,  # a denoiser works on [0, 1] images as they are
            "std": [1.0] * channels,
            "sigmas": list(c.noise_levels),
            "objective": c.objective,
            "classifier": c.classifier,
            "classifier_fingerprint": model_fingerprint(self.classifier)[:16],
            "epoch": epoch,
            "train_config": dataclasses.asdict(c),
        }

    def save(self, epoch: int, is_best: bool) -> None:
        extra = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "best_accuracy": self.best_accuracy,
            "log_rows": self.log_rows,
        }
        if is_best:  # before last.pt, the commit point of an epoch (as in train/loop.py)
            save_checkpoint(self.out / "best.pt", self.denoiser, self.meta(epoch), **extra)
        save_checkpoint(self.out / "last.pt", self.denoiser, self.meta(epoch), **extra)

    def _resume(self) -> None:
        path = self.out / "last.pt"
        if not path.exists():
            raise CheckpointError(f"--resume: no checkpoint at {path}")
        loaded = load_checkpoint(path, device=self.device)
        meta = loaded.meta
        if meta.get("kind") != "denoiser" or meta.get("arch") != self.config.arch:
            raise CheckpointError(f"--resume: {path} is not a {self.config.arch} denoiser run")
        if meta.get("classifier_fingerprint") != model_fingerprint(self.classifier)[:16]:
            raise CheckpointError(
                f"--resume: {path} was trained for another classifier than {self.config.classifier}"
            )
        recorded = (list(meta.get("sigmas", [])), meta.get("objective"))
        if recorded != (list(self.config.noise_levels), self.config.objective):
            raise CheckpointError(
                f"--resume: {path} was trained at --sigmas {','.join(map(str, recorded[0]))} "
                f"with --objective {recorded[1]}; resume with those, or choose another --out"
            )
        payload = loaded.payload
        self.denoiser.load_state_dict(loaded.model.state_dict())
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        torch.set_rng_state(payload["rng"]["torch"])
        self.best_accuracy = float(payload["best_accuracy"])
        self.log_rows = [dict(row) for row in payload["log_rows"]]
        self.start_epoch = int(meta["epoch"]) + 1

    def _loader(self, epoch: int) -> DataLoader:
        c = self.config
        dataset = self.train_set
        if c.train_subset and c.train_subset < len(dataset):
            dataset = Subset(dataset, training_subset(len(dataset), c.train_subset, c.seed))
        generator = torch.Generator().manual_seed(c.seed * 1000 + epoch)
        return DataLoader(
            dataset, batch_size=c.batch, sampler=RandomSampler(dataset, generator=generator)
        )

    def train_epoch(self, epoch: int) -> dict:
        stability = epoch >= self.config.stability_from
        self.denoiser.train()
        seen = agree = 0
        total = 0.0
        start = time.perf_counter()
        bar = tqdm(
            self._loader(epoch),
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            unit="batch",
            disable=None if self.config.progress else True,
            leave=False,
        )
        for x, _, _ in bar:
            x = x.to(self.device)
            pick = torch.randint(len(self.sigmas), (len(x),))
            sigma = self.sigmas[pick].to(self.device)
            loss, logits = denoiser_loss(self.denoiser, self.classifier, x, sigma, stability)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the denoiser's loss became {loss.item()} in epoch {epoch + 1}; lower --lr "
                    "and start again; the last finished epoch is kept in last.pt"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            seen += len(x)
            total += loss.item() * len(x)
            with torch.no_grad():
                agree += (logits.argmax(1) == self.classifier(x).argmax(1)).sum().item()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        self.scheduler.step()
        elapsed = time.perf_counter() - start
        return {
            "objective": "stability" if stability else "mse",
            "loss": total / seen,
            "train_agreement": agree / seen,
            "epoch_time": elapsed,
        }

    def evaluate(self) -> dict:
        """Accuracy of f(D(x + sigma e)) (one noise sample) at each sigma, and of f on clean
        images, on `eval_max` test images spread over the split."""
        chosen = spread_indices(len(self.test_set), self.config.eval_max)
        loader = DataLoader(Subset(self.test_set, chosen), batch_size=self.config.batch)
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        composed = Denoised(self.denoiser, self.classifier)
        right = {float(s): 0 for s in self.sigmas}
        clean = 0
        with frozen_eval(composed), torch.inference_mode():
            for x, y, _ in loader:
                x, y = x.to(self.device), y.to(self.device)
                clean += (self.classifier(x).argmax(1) == y).sum().item()
                for s in right:
                    e = torch.randn(x.shape, generator=generator, device=self.device)
                    right[s] += (composed(x + s * e).argmax(1) == y).sum().item()
        row = {"test_clean_acc": clean / len(chosen)}
        row.update({f"test_noisy_acc@{s:g}": k / len(chosen) for s, k in right.items()})
        row["test_noisy_acc"] = sum(right.values()) / (len(right) * len(chosen))
        return row

    def run(self) -> Path:
        """Train from start_epoch to epochs; returns the path of the last checkpoint."""
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.out)
        logger = EpochLog(self.out / "log.csv", enabled=True)
        logger.rewrite(self.log_rows)
        try:
            for epoch in range(self.start_epoch, self.config.epochs):
                lr = self.optimizer.param_groups[0]["lr"]
                row = {"epoch": epoch + 1, "lr": lr, **self.train_epoch(epoch), **self.evaluate()}
                is_best = row["test_noisy_acc"] > self.best_accuracy
                self.best_accuracy = max(self.best_accuracy, row["test_noisy_acc"])
                self.log_rows.append(row)
                self.save(epoch, is_best)
                logger.write(row)
                tqdm.write("  ".join(_shown(k, v) for k, v in row.items()))
        finally:
            logger.close()
        return self.out / "last.pt"


def _shown(key: str, value) -> str:
    return f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"


def train_denoiser(config: DenoiserConfig) -> Path:
    """Train a denoiser as configured; returns the path of its last checkpoint."""
    return DenoiserTrainer(config).run()
