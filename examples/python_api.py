"""The Python API in one runnable file (README's "Python API"; run by the tests).

    .venv/bin/python examples/python_api.py [OUT_DIR]

Trains a small CNN on the built-in digits for two epochs (a few seconds), then certifies and
predicts with a fixed sigma, chooses per-input sigmas, and answers queries with the online
data-dependent classifier and its memory. Sigmas and radii are L2 in [0, 1] pixel units.
"""

import sys
import tempfile
from pathlib import Path

import torch

from ddrs.classifier import DataDependentSmoothClassifier
from ddrs.core.sigma import certified_sigma_search
from ddrs.core.smooth import Smooth
from ddrs.data import get_dataset
from ddrs.memory import CertificationMemory
from ddrs.models import load_checkpoint
from ddrs.models.identity import memory_fingerprint
from ddrs.report import summary_line
from ddrs.runs import CertifyRun, certify_dataset
from ddrs.train.loop import TrainConfig, train


def main(out: Path) -> None:
    test = get_dataset("digits", "test")
    checkpoint = train(
        TrainConfig(
            dataset="digits",
            arch="cnn",
            out=str(out / "model"),
            sigma=0.25,
            epochs=2,
            batch=64,
            lr=0.05,
            progress=False,
        )
    )
    model = load_checkpoint(checkpoint).model  # maps [0, 1] images to logits

    indices = [0, 1, 2, 3]
    x = test[0][0]  # one (1, 8, 8) image in [0, 1]
    xs = torch.stack([test[i][0] for i in indices])

    smooth = Smooth(model, num_classes=10, seed=0)
    cert = smooth.certify(x, sigma=0.25, n0=100, n=1000, alpha=0.001, batch=256)
    print("certify:", cert.predict, round(cert.radius, 3))  # class (or -1), L2 radius
    label = smooth.predict(x, sigma=0.25, n=1000, alpha=0.001)
    print("predict:", label)

    # per-input sigmas: the certified selector, scored at the N and alpha used below
    sigmas = certified_sigma_search(model, xs, sigma0=0.25, n=1000, alpha=0.001, keys=indices).sigma
    certs = smooth.certify_batch(xs, sigmas, n0=100, n=1000, alpha=0.001, keys=indices)
    print(
        "per-input sigmas:",
        [round(float(s), 3) for s in sigmas],
        "radii:",
        [round(c.radius, 3) for c in certs],
    )

    # online data-dependent smoothing: sigma search + CERTIFY + the memory, one query at a time
    shape = test.info.input_shape
    memory = CertificationMemory(
        out / "memory.sqlite", memory_fingerprint(model, "digits", shape), shape
    )
    with memory:
        clf = DataDependentSmoothClassifier(model, 10, memory, sigma0=0.25, n=1000)
        for i in indices:
            answer = clf.certify(test[i][0], key=i)
            print(
                f"input {i}: class {answer.predict}, radius {answer.radius:.3f}, "
                f"sigma {answer.sigma:.3f}, changed {answer.changed}, shrunk {answer.shrunk}"
            )

    # a whole dataset, resumable, checked and recorded exactly as `ddrs certify` does it
    run = CertifyRun(out=str(out / "cert.tsv"), sigma=0.25, n0=100, n=1000, skip=60)
    certify_dataset(model, test, run)
    print(summary_line(run.out))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as folder:
            main(Path(folder))
