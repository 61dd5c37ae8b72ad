"""Epoch time on a folder of one's own small images: at their own size against the old default
(every image upscaled to 224 x 224 with ImageNet's transforms), in the same run.

The folder: 3 classes of 32 x 32 JPEGs, 900 for training and 180 for test (generated here, as
in tests/test_own_data.py). `cnn_small`, batch 64; each variant trains `--epochs` epochs, the
variants in turn (`--repeats` rounds, order rotated), and the median epoch time is compared.

    .venv/bin/python benchmarks/own_images.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import interleaved, median, print_machine, save_json, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_own_data import write_folder  # noqa: E402

from ddrs.train.config import TrainConfig
from ddrs.train.loop import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    machine = print_machine("own images: native size against 224 x 224", args)
    with tempfile.TemporaryDirectory() as scratch:
        root = write_folder(Path(scratch) / "images", {"train": 300, "test": 60}, sizes=(32,))
        variants = {
            "native 32 x 32 (default)": {},
            "224 x 224, ImageNet transforms (the old default)": {
                "image_size": (224, 224),
                "normalize": "imagenet",
            },
        }
        epoch_seconds: dict[str, list[float]] = {name: [] for name in variants}
        runs = iter(range(10_000))

        def trainer(name: str, options: dict):
            def run():
                out = Path(scratch) / f"run{next(runs)}"
                t = Trainer(
                    TrainConfig(
                        dataset="imagefolder",
                        data_root=str(root),
                        arch="cnn_small",
                        sigma=0.25,
                        epochs=args.epochs,
                        batch=64,
                        lr=0.05,
                        eval_max=60,
                        progress=False,
                        out=str(out),
                        **options,
                    )
                )
                t.run()
                epoch_seconds[name] += [row["epoch_time"] for row in t.log_rows]

            return run

        interleaved(
            {name: trainer(name, options) for name, options in variants.items()}, args.repeats
        )
    base = median(epoch_seconds["native 32 x 32 (default)"])
    rows = [
        [name, f"{median(t):.2f}", f"{median(t) / base:.1f}"] for name, t in epoch_seconds.items()
    ]
    print("\n## 900 training images of 32 x 32, 3 classes, cnn_small, batch 64")
    print(table(["inputs", "median epoch s", "ratio to native"], rows))
    save_json(args.json, {"machine": machine, "args": vars(args), "epochs": epoch_seconds})


if __name__ == "__main__":
    main()
