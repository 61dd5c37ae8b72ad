"""The denoiser's share of a certification (denoised smoothing, `--denoiser`).

Every noisy sample passes the denoiser D and then the classifier f once, so the number of
forward passes is that of the classifier alone; what changes is each pass's cost. On the
same inputs, seed and keys, in turn (order rotated every round), median wall time of:
  * CERTIFY with f alone;
  * CERTIFY with f o D;
  * the bare forward passes of f, of D, and of f o D on one batch of noisy inputs.
D's share = 1 - time(f) / time(f o D).

    .venv/bin/python benchmarks/denoiser_cost.py                    # digits, trained here
    .venv/bin/python benchmarks/denoiser_cost.py --classifier runs/cifar10_denoised/clean/last.pt \
        --denoiser runs/cifar10_denoised/denoiser-stability-0.25/last.pt --dataset cifar10 \
        --data-root data/cifar10
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import (
    add_common_args,
    apply_threads,
    interleaved,
    median,
    paired_ratio,
    print_machine,
    save_json,
    table,
)

from ddrs.core.smooth import Smooth
from ddrs.data import get_dataset
from ddrs.models import Denoised, load_checkpoint, load_denoiser
from ddrs.train.denoiser import DenoiserConfig, train_denoiser
from ddrs.train.loop import TrainConfig, train


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classifier", help="a checkpoint (default: a digits CNN trained here)")
    p.add_argument("--denoiser", help="a denoiser (default: one trained here for it)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root")
    p.add_argument("--inputs", type=int, default=20, help="test inputs certified")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=400, help="noisy samples per forward pass")
    p.add_argument("--repeats", type=int, default=3)
    add_common_args(p)
    return p.parse_args()


def trained_here(folder: Path) -> tuple[str, str]:
    """A clean digits CNN and a stability denoiser for it (seconds)."""
    classifier = train(
        TrainConfig(
            dataset="digits", arch="cnn", sigma=0.0, epochs=3, batch=64, lr=0.05,
            out=str(folder / "clean"), progress=False,
        )
    )  # fmt: skip
    denoiser = train_denoiser(
        DenoiserConfig(
            classifier=str(classifier), dataset="digits", sigmas="0.25", arch="dncnn_small",
            epochs=3, batch=64, out=str(folder / "denoiser"), progress=False,
        )
    )  # fmt: skip
    return str(classifier), str(denoiser)


def main() -> None:
    args = parse_args()
    apply_threads(args)
    info = print_machine("denoiser cost", args)
    if args.quick:
        args.inputs, args.repeats = 5, 2
    with tempfile.TemporaryDirectory() as tmp:
        classifier_path, denoiser_path = args.classifier, args.denoiser
        if classifier_path is None:
            classifier_path, denoiser_path = trained_here(Path(tmp))
        test = get_dataset(args.dataset, "test", args.data_root, augment=False)
        shape = test.info.input_shape
        classifier = load_checkpoint(classifier_path).model
        denoiser = load_denoiser(denoiser_path, shape)
        composed = Denoised(denoiser, classifier).eval()
        step = max(1, len(test) // args.inputs)
        x = torch.stack([test[i * step][0] for i in range(args.inputs)])
        keys = list(range(args.inputs))
        noisy = test[0][0].unsqueeze(0) + args.sigma * torch.randn(args.batch, *shape)

        def certify(model):
            smooth = Smooth(model, test.info.num_classes)
            return lambda: smooth.certify_batch(
                x, args.sigma, args.n0, args.n, 0.001, args.batch, keys=keys
            )

        def forward(model):
            def run():
                with torch.inference_mode():
                    model(noisy)

            return run

        times = interleaved(
            {
                "CERTIFY, f alone": certify(classifier),
                "CERTIFY, f o D": certify(composed),
                "forward f": forward(classifier),
                "forward D": forward(denoiser),
                "forward f o D": forward(composed),
            },
            args.repeats,
            warmup=True,
        )
    base = times["CERTIFY, f alone"]
    rows = [
        [name, f"{median(t):.3f}", f"{paired_ratio(t, base):.2f} x"]
        for name, t in times.items()
        if name.startswith("CERTIFY")
    ]
    fwd = times["forward f"]
    rows += [
        [name, f"{median(t):.4f}", f"{paired_ratio(t, fwd):.2f} x forward f"]
        for name, t in times.items()
        if name.startswith("forward")
    ]
    share = 1 - median(fwd) / median(times["forward f o D"])
    print(table(["variant", "median s", "ratio"], rows))
    print(
        f"\nforward passes per input: {args.n0 + args.n} of f o D (each one pass of D and one "
        f"of f), the same count as f alone; D's share of the forward time: {share:.0%}"
    )
    save_json(args.json, {"machine": info, "times": times, "denoiser_share": share})


if __name__ == "__main__":
    main()
