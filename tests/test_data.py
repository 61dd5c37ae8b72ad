"""Tests for ddrs.data: small datasets in the real on-disk formats, generated in tmp_path."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ddrs.data import (
    DATASET_NAMES,
    DatasetInfo,
    ImageOptions,
    dataset_info,
    get_dataset,
    resolve_data_root,
)
from ddrs.data import digits as digits_module
from ddrs.data.transforms import (
    random_crop_flip,
    random_resized_crop_box,
    resize_shorter,
)
from ddrs.errors import DatasetError

CIFAR_JPEG_TAR = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"
CIFAR_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@pytest.fixture(autouse=True)
def no_env_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DDRS_DATA_ROOT", raising=False)


def check_items(ds, shape: tuple[int, ...], n: int | None = None) -> None:
    if n is not None:
        assert len(ds) == n
    for i in (0, len(ds) - 1):
        x, label, index = ds[i]
        assert x.dtype == torch.float32 and tuple(x.shape) == shape
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert isinstance(label, int) and 0 <= label < ds.info.num_classes
        assert index == i and label == ds.targets[i]
    assert tuple(ds.info.input_shape) == shape


# ---------------------------------------------------------------- writers of the real formats


def write_idx(path: Path, magic: int, array: np.ndarray, gz: bool = False) -> Path:
    data = (
        struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    )
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_mnist(directory: Path, n_train: int = 12, n_test: int = 6, gz: bool = False) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(directory / f"{prefix}-images-idx3-ubyte", 2051, images, gz)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", 2049, labels, gz)
        arrays[prefix] = (images, labels)
    return arrays


def write_cifar_pickles(directory: Path, per_batch: int = 20) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(2)
    written = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(y) for y in rng.integers(0, 10, per_batch)]
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        written[name] = data
    with open(directory / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR_CLASSES]}, f)
    return written


def save_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 3 if mode == "RGB" else 1
    shape = (size[1], size[0], channels) if channels == 3 else (size[1], size[0])
    arr = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)
    return arr


def write_folder(root: Path, splits: dict[str, int], classes, size, ext=".png") -> None:
    seed = 0
    for split, per_class in splits.items():
        for c in classes:
            for k in range(per_class):
                seed += 1
                suffix = ext if k % 2 == 0 else ".jpg"
                save_image(root / split / c / f"{k:04d}{suffix}", size, seed)


# ---------------------------------------------------------------------------------- registry


def test_names_and_info() -> None:
    assert DATASET_NAMES == ("digits", "mnist", "cifar10", "imagenet", "imagefolder", "npz")
    info = dataset_info("cifar10")
    assert isinstance(info, DatasetInfo)
    assert info.input_shape == (3, 32, 32) and info.num_classes == 10
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.std == (0.2023, 0.1994, 0.2010)
    assert dataset_info("mnist").mean == (0.1307,)
    assert dataset_info("imagenet").num_classes == 1000
    assert dataset_info("imagenet", root="/nonexistent").classes is None


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'.*digits, mnist, cifar10"):
        get_dataset("svhn")
    with pytest.raises(DatasetError, match="choose one of"):
        dataset_info("svhn")


def test_bad_split() -> None:
    with pytest.raises(DatasetError, match="unknown split 'validation'"):
        get_dataset("digits", "validation")


def test_missing_root(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetError, match="DDRS_DATA_ROOT.*nothing is downloaded"):
        get_dataset("mnist")


def test_env_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_data_root(None) is None
    assert resolve_data_root(tmp_path) == tmp_path
    write_mnist(tmp_path)
    monkeypatch.setenv("DDRS_DATA_ROOT", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    assert resolve_data_root("/elsewhere") == Path("/elsewhere")
    assert len(get_dataset("mnist", "train")) == 12


# ------------------------------------------------------------------------------------ digits


def test_digits_split() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test = get_dataset("digits", "train"), get_dataset("digits")
    check_items(train, (1, 8, 8), 1437)
    check_items(test, (1, 8, 8), 360)
    perm = np.random.default_rng(0).permutation(1797)
    assert test.targets == bunch.target[perm[1437:]].tolist()
    x, label, _ = test[5]
    assert np.allclose(x.numpy()[0], bunch.images[perm[1437 + 5]] / 16.0)
    assert train.transform is None  # never augmented


def test_digits_mean_std_match_train_split() -> None:
    train = get_dataset("digits", "train")
    images = train.images.float() / 16.0
    assert abs(images.mean().item() - digits_module.INFO.mean[0]) < 1e-4
    assert abs(images.std().item() - digits_module.INFO.std[0]) < 1e-4


def test_negative_and_out_of_range_index() -> None:
    ds = get_dataset("digits")
    assert ds[-1][2] == len(ds) - 1
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataloader_batches() -> None:
    x, y, i = next(iter(DataLoader(get_dataset("digits"), batch_size=4)))
    assert x.shape == (4, 1, 8, 8) and y.tolist() == get_dataset("digits").targets[:4]
    assert i.tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------- mnist


@pytest.mark.parametrize(
    ("subdir", "gz"), [("", False), ("", True), ("MNIST/raw", True), ("mnist", False)]
)
def test_mnist_layouts(tmp_path: Path, subdir: str, gz: bool) -> None:
    arrays = write_mnist(tmp_path / subdir, gz=gz)
    train = get_dataset("mnist", "train", root=tmp_path)
    test = get_dataset("mnist", "test", root=tmp_path)
    check_items(train, (1, 28, 28), 12)
    check_items(test, (1, 28, 28), 6)
    images, labels = arrays["t10k"]
    assert test.targets == labels.tolist()
    assert torch.equal(test[3][0][0], torch.from_numpy(images[3]).float() / 255)
    assert train.transform is None


def test_mnist_missing_lists_paths(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        get_dataset("mnist", root=tmp_path / "nowhere")
    message = str(err.value)
    assert "MNIST" in message and "nothing is downloaded" in message
    assert "t10k-images-idx3-ubyte" in message
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message


def test_mnist_bad_magic(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", 2049, np.zeros((6, 28, 28), np.uint8))
    with pytest.raises(
        DatasetError, match="t10k-images-idx3-ubyte has magic number 2049, expected 2051"
    ):
        get_dataset("mnist", root=tmp_path)


def test_mnist_truncated(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte has \d+ bytes, expected \d+"):
        get_dataset("mnist", root=tmp_path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DatasetError, match="idx header"):
        get_dataset("mnist", root=tmp_path)


def test_mnist_truncated_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz"):
        get_dataset("mnist", "train", root=tmp_path)


def test_mnist_label_count_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", 2049, np.zeros(5, np.uint8))
    with pytest.raises(DatasetError, match="5 labels but .* 6 images"):
        get_dataset("mnist", root=tmp_path)


# ------------------------------------------------------------------------ cifar10, pickles


@pytest.mark.parametrize("inside", [True, False])
def test_cifar_pickles(tmp_path: Path, inside: bool) -> None:
    batch_dir = tmp_path / "cifar-10-batches-py"
    written = write_cifar_pickles(batch_dir)
    root = batch_dir if inside else tmp_path
    train = get_dataset("cifar10", "train", root=root, augment=False)
    test = get_dataset("cifar10", "test", root=root)
    check_items(train, (3, 32, 32), 100)
    check_items(test, (3, 32, 32), 20)
    expected = written["data_batch_2"][3].reshape(3, 32, 32)
    assert torch.equal(train[23][0], torch.from_numpy(expected).float() / 255)
    with open(batch_dir / "test_batch", "rb") as f:
        assert test.targets == pickle.load(f)[b"labels"]


def test_cifar_augmentation(tmp_path: Path) -> None:
    write_cifar_pickles(tmp_path / "cifar-10-batches-py")
    plain = get_dataset("cifar10", "train", root=tmp_path, augment=False)
    augmented = get_dataset("cifar10", "train", root=tmp_path)  # augment=None -> train augments
    assert get_dataset("cifar10", "test", root=tmp_path).transform is None
    torch.manual_seed(0)
    first = torch.stack([augmented[i][0] for i in range(len(augmented))])
    torch.manual_seed(0)
    again = torch.stack([augmented[i][0] for i in range(len(augmented))])
    originals = torch.stack([plain[i][0] for i in range(len(plain))])
    assert torch.equal(first, again)  # torch's global RNG drives it
    assert first.shape == originals.shape
    assert first.min() >= 0 and first.max() <= 1
    assert not torch.equal(first, originals)
    assert augmented.targets == plain.targets


def test_random_crop_flip_keeps_content() -> None:
    x = torch.rand(3, 32, 32)
    torch.manual_seed(3)
    outs = [random_crop_flip(x) for _ in range(20)]
    assert all(o.shape == x.shape for o in outs)
    assert not all(torch.equal(o, x) for o in outs)
    # Every output is a shifted (maybe flipped) window of the zero-padded input.
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for o in outs:
        windows = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(o, w) or torch.equal(o, w.flip(-1)) for w in windows)


def test_cifar_bad_pickle(tmp_path: Path) -> None:
    batch_dir = tmp_path / "cifar-10-batches-py"
    write_cifar_pickles(batch_dir)
    (batch_dir / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="cannot unpickle .*test_batch"):
        get_dataset("cifar10", root=tmp_path)
    (batch_dir / "data_batch_4").unlink()
    with pytest.raises(DatasetError, match="missing batch file .*data_batch_4"):
        get_dataset("cifar10", "train", root=tmp_path)


def test_cifar_bad_shape(tmp_path: Path) -> None:
    batch_dir = tmp_path / "cifar-10-batches-py"
    write_cifar_pickles(batch_dir)
    with open(batch_dir / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 1024), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(DatasetError, match=r"expected uint8 \(N, 3072\)"):
        get_dataset("cifar10", root=tmp_path)


def test_cifar_missing_lists_layouts(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        get_dataset("cifar10", root=tmp_path)
    message = str(err.value)
    assert "CIFAR-10" in message and "nothing is downloaded" in message
    assert "cifar-10-batches-py" in message and "ImageFolder" in message
    assert str(tmp_path / "cifar10-jpeg") in message


# -------------------------------------------------------------------- cifar10, ImageFolder


@pytest.mark.parametrize("subdir", ["", "cifar10", "cifar10-jpeg"])
def test_cifar_folder(tmp_path: Path, subdir: str) -> None:
    write_folder(tmp_path / subdir, {"train": 3, "test": 2}, CIFAR_CLASSES[::-1], (32, 32))
    test = get_dataset("cifar10", "test", root=tmp_path)
    check_items(test, (3, 32, 32), 20)
    assert test.targets == [k // 2 for k in range(20)]  # sorted folder names give 0..9
    assert test.info.classes == CIFAR_CLASSES
    png = np.array(Image.open(tmp_path / subdir / "test" / "bird" / "0000.png"))
    assert torch.equal(test[4][0], torch.from_numpy(png).permute(2, 0, 1).float() / 255)
    again = get_dataset("cifar10", "test", root=tmp_path)
    assert torch.equal(test.images, again.images)  # deterministic order
    train = get_dataset("cifar10", "train", root=tmp_path)
    assert len(train) == 30 and train.transform is random_crop_flip


def test_cifar_folder_wrong_size_or_classes(tmp_path: Path) -> None:
    write_folder(tmp_path, {"test": 1}, CIFAR_CLASSES, (32, 32))
    save_image(tmp_path / "test" / "cat" / "big.png", (40, 32), seed=9)
    with pytest.raises(DatasetError, match="big.png is 40x32 pixels, expected 32x32"):
        get_dataset("cifar10", root=tmp_path)
    write_folder(tmp_path / "nine", {"test": 1}, CIFAR_CLASSES[:9], (32, 32))
    with pytest.raises(DatasetError, match="9 class folders, expected 10"):
        get_dataset("cifar10", root=tmp_path / "nine")


def test_cifar_jpeg_archive() -> None:
    if not CIFAR_JPEG_TAR.is_file():
        pytest.skip(f"CIFAR-10 JPEG archive not found at {CIFAR_JPEG_TAR} (shared data absent)")
    checked = 0
    with tarfile.open(CIFAR_JPEG_TAR, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            parts = Path(member.name).parts
            assert parts[-3] in ("train", "test") and parts[-2] in CIFAR_CLASSES
            img = Image.open(io.BytesIO(tar.extractfile(member).read()))
            assert img.size == (32, 32) and img.mode == "RGB"
            checked += 1
            if checked == 3:
                break
    assert checked == 3


# ------------------------------------------------------------------ imagenet / imagefolder


def test_imagenet(tmp_path: Path) -> None:
    classes = ("n01440764", "n01443537", "n01484850")
    write_folder(tmp_path, {"train": 2, "val": 1}, classes, (300, 260), ext=".JPEG")
    info = dataset_info("imagenet", root=tmp_path)
    assert info.num_classes == 3 and info.classes == classes
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    test = get_dataset("imagenet", "test", root=tmp_path)
    check_items(test, (3, 224, 224), 3)
    assert test.targets == [0, 1, 2]
    assert torch.equal(test[1][0], test[1][0])  # test transform is deterministic
    train = get_dataset("imagenet", "train", root=tmp_path)
    check_items(train, (3, 224, 224), 6)
    torch.manual_seed(0)
    a = train[0][0]
    torch.manual_seed(0)
    assert torch.equal(a, train[0][0])
    assert not torch.equal(a, train[0][0])


def test_imagenet_test_transform_is_center_crop(tmp_path: Path) -> None:
    arr = save_image(tmp_path / "val" / "c" / "a.png", (256, 300), seed=4)
    x = get_dataset("imagenet", root=tmp_path)[0][0]
    top = round((300 - 224) / 2)
    expected = torch.from_numpy(arr[top : top + 224, 16:240]).permute(2, 0, 1).float() / 255
    assert torch.equal(x, expected)  # shorter side already 256: crop only


def test_imagenet_in_subdir_and_missing(tmp_path: Path) -> None:
    write_folder(tmp_path / "imagenet", {"val": 1}, ("a", "b"), (300, 260))
    assert len(get_dataset("imagenet", root=tmp_path)) == 2
    with pytest.raises(DatasetError) as err:
        get_dataset("imagenet", "train", root=tmp_path)
    assert str(tmp_path / "imagenet" / "train") in str(err.value)
    assert "nothing is downloaded" in str(err.value)


def test_imagefolder(tmp_path: Path) -> None:
    write_folder(tmp_path, {"train": 2, "val": 2}, ("dog", "cat"), (50, 40))
    save_image(tmp_path / "train" / "cat" / "gray.png", (64, 64), seed=5, mode="L")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    with pytest.raises(DatasetError, match="--image-size"):  # two sizes: the user chooses
        dataset_info("imagefolder", root=tmp_path)
    options = ImageOptions(image_size=(224, 224))
    info = dataset_info("imagefolder", root=tmp_path, options=options)
    assert info.classes == ("cat", "dog") and info.mean == (0.5, 0.5, 0.5)
    train = get_dataset("imagefolder", "train", root=tmp_path, augment=False, options=options)
    check_items(train, (3, 224, 224), 5)
    assert train.targets == [0, 0, 0, 1, 1]
    assert [p.name for p in train.paths[:3]] == ["0000.png", "0001.jpg", "gray.png"]
    test = get_dataset("imagefolder", "test", root=tmp_path, options=options)  # reads val/
    assert len(test) == 4 and test.split == "test"


def test_imagefolder_prefers_test_dir(tmp_path: Path) -> None:
    write_folder(tmp_path, {"train": 1, "val": 1, "test": 2}, ("a", "b"), (30, 30))
    assert len(get_dataset("imagefolder", "test", root=tmp_path)) == 4


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="imagefolder: no data root"):
        dataset_info("imagefolder")
    write_folder(tmp_path, {"train": 1, "test": 1}, ("a", "b"), (30, 30))
    write_folder(tmp_path, {"test": 1}, ("c",), (30, 30))
    with pytest.raises(DatasetError, match="differ from those of the train split"):
        get_dataset("imagefolder", "test", root=tmp_path)
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        get_dataset("imagefolder", "train", root=tmp_path / "empty")
    (tmp_path / "bad" / "train" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "train" / "a" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="cannot decode image .*x.jpg"):
        get_dataset("imagefolder", "train", root=tmp_path / "bad")[0]


def test_resize_and_random_resized_crop() -> None:
    assert resize_shorter(Image.new("RGB", (300, 260)), 256).size == (295, 256)
    assert resize_shorter(Image.new("RGB", (100, 400)), 256).size == (256, 1024)
    torch.manual_seed(1)
    for _ in range(50):
        left, top, w, h = random_resized_crop_box(300, 260)
        assert 0 <= left and left + w <= 300 and 0 <= top and top + h <= 260
        assert 0.08 * 300 * 260 * 0.9 <= w * h
    assert random_resized_crop_box(1000, 10, scale=(0.99, 1.0)) == (493, 0, 13, 10)
