"""Data layer: every reader against small fake files written in the exact on-disk format."""

from __future__ import annotations

import gzip
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imagetx.data import (
    DATASETS,
    DatasetError,
    ImageDataset,
    SuperResDataset,
    area_downsample,
    celeba_superres_crop,
    load_dataset,
)
from imagetx.data import builtin
from imagetx.data.transforms import resize_images, rgb_to_gray
from imagetx.errors import ConfigError
from support.datasets import channel_major, idx_bytes, random_images, write_celeba, write_cifar10, write_idx, write_pngs


def pil_gray(images: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in images])[..., None]


# ----------------------------------------------------------------------------- transforms


def test_area_downsample_constant_stays_constant():
    for value in (0, 1, 127, 254, 255):
        x = torch.full((2, 30, 22, 3), value, dtype=torch.uint8)
        for size in [(15, 11), (8, 8), (7, 5), (1, 1)]:
            y = area_downsample(x, size)
            assert y.shape == (2, *size, 3) and y.dtype == torch.uint8
            assert (y == value).all()


def test_area_downsample_2x2_block_mean_is_exact():
    x = torch.from_numpy(random_images(3, 8, 6))
    y = area_downsample(x, (4, 3))
    blocks = x.reshape(3, 4, 2, 3, 2, 3).to(torch.int64).sum(dim=(2, 4))  # (N, 4, 3, C) sums of 4
    expected = torch.round(blocks.to(torch.float64) / 4)  # round half to even
    assert torch.equal(y, expected.to(torch.uint8))
    reference = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(4, 3), mode="area").round()
    assert torch.equal(y, reference.permute(0, 2, 3, 1).to(torch.uint8))


def test_area_downsample_fractional_factor_is_exact_area_mean():
    # 138 -> 32: repeat every pixel 32 times, then 138x138 blocks are exactly the output cells.
    x = random_images(1, 138, 138, 1)
    fine = x[0, :, :, 0].astype(np.float64).repeat(32, axis=0).repeat(32, axis=1)  # (4416, 4416)
    exact = np.rint(fine.reshape(32, 138, 32, 138).mean(axis=(1, 3)))
    ours = area_downsample(torch.from_numpy(x), (32, 32))[0, :, :, 0].numpy()
    assert np.abs(ours - exact).max() <= 1 and (ours == exact).mean() > 0.99


def test_gray_conversion_is_pillow_luma():
    x = random_images(4, 9, 7)
    assert np.array_equal(rgb_to_gray(torch.from_numpy(x)).numpy(), pil_gray(x))


# ----------------------------------------------------------------------------- CIFAR


def test_cifar10_layout_pixels_labels_and_splits(tmp_path):
    written = write_cifar10(tmp_path)
    train = load_dataset("cifar10", tmp_path, split="train")
    assert len(train) == 20 and train.images.shape == (20, 32, 32, 3) and train.images.dtype == torch.uint8
    assert train.num_classes == 10 and train.class_names[3] == "class3" and train.channels == 3
    # A known pixel: batch 2, image 1, row 5, column 7, green channel.
    images2, labels2 = written["data_batch_2"]
    row = channel_major(images2)[1]
    assert train.images[4 + 1, 5, 7, 1] == row[1024 + 5 * 32 + 7] == images2[1, 5, 7, 1]
    assert train[5][1] == labels2[1]
    test = load_dataset("cifar10", tmp_path / "cifar-10-batches-py", split="test")  # the folder itself
    assert torch.equal(test.images, torch.from_numpy(written["test_batch"][0]))
    assert test.labels.tolist() == written["test_batch"][1]
    assert test.description == "CIFAR-10 32x32, test split"
    batch, labels = test.get_batch([2, 0])
    assert torch.equal(batch[1], test.images[0]) and labels.tolist() == [test[2][1], test[0][1]]


def test_cifar_resize_and_grayscale(tmp_path):
    written = write_cifar10(tmp_path)
    test = load_dataset("cifar10", tmp_path, split="test", image_size=(16, 16), channels=1)
    gray = torch.from_numpy(pil_gray(written["test_batch"][0]))
    assert torch.equal(test.images, area_downsample(gray, (16, 16)))
    assert test.image_size == (16, 16) and test.channels == 1
    assert "resized to 16x16" in test.description and "grayscale" in test.description


class _RunsCode:
    """Pickles to a call of os.mkdir: what a hostile CIFAR batch could carry."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.target,))


def test_a_cifar_batch_carrying_code_is_refused_not_run(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "the-code-ran"
    folder = tmp_path / "cifar-10-batches-py"
    batch = pickle.loads((folder / "test_batch").read_bytes())
    batch["labels"] = [_RunsCode(marker)] + batch["labels"][1:]
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetError, match="refusing CIFAR file .*test_batch: it asks to run posix.mkdir"):
        load_dataset("cifar10", tmp_path, split="test")
    assert not marker.exists()


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = random_images(6, 32, 32)
    for fname in ("train", "test"):
        batch = {"data": channel_major(images), "fine_labels": [0, 99, 5, 6, 7, 8], "coarse_labels": [0] * 6}
        (folder / fname).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [str(i) for i in range(100)]}))
    ds = load_dataset("cifar100", tmp_path, split="test")
    assert ds.num_classes == 100 and ds.labels.tolist() == [0, 99, 5, 6, 7, 8]
    assert torch.equal(ds.images, torch.from_numpy(images))


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(DatasetError, match="cifar10 not found") as info:
        load_dataset("cifar10", tmp_path)
    assert "cifar-10-batches-py/" in str(info.value) and "data_batch_1" in str(info.value)
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])  # truncated
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path, split="train")
    path.unlink()
    with pytest.raises(DatasetError, match="data_batch_3") as info:
        load_dataset("cifar10", tmp_path, split="train")
    assert "expected:" in str(info.value)
    load_dataset("cifar10", tmp_path, split="test")  # the other split is intact


def test_failed_download_shows_tree(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DatasetError, match="downloading cifar10 .* failed") as info:
        load_dataset("cifar10", tmp_path, download=True)
    assert "cifar-10-batches-py/" in str(info.value)
    with pytest.raises(DatasetError, match="downloading fashion-mnist .* failed"):
        load_dataset("fashion-mnist", tmp_path, download=True)


# ----------------------------------------------------------------------------- MNIST (IDX)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_idx(tmp_path, gz, layout):
    train = (random_images(7, 28, 28, 1)[..., 0], np.arange(7) % 10)
    test = (random_images(3, 28, 28, 1)[..., 0], np.array([9, 0, 4]))
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    write_idx(folder, {"train": train, "t10k": test}, gz)
    ds = load_dataset("mnist", tmp_path, split="test")
    assert ds.images.shape == (3, 28, 28, 1) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[..., 0], torch.from_numpy(test[0])) and ds.labels.tolist() == [9, 0, 4]
    assert len(load_dataset("mnist", tmp_path, split="train")) == 7
    rgb = load_dataset("mnist", tmp_path, split="test", channels=3)
    assert rgb.images.shape == (3, 28, 28, 3) and (rgb.images == ds.images).all()


def test_mnist_malformed_files(tmp_path):
    images, labels = random_images(4, 28, 28, 1)[..., 0], np.arange(4)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images, 2049))  # wrong magic
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 2049))
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.*magic"):
        load_dataset("mnist", tmp_path, split="test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images, 2051)[:-5])  # truncated
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.*bytes"):
        load_dataset("mnist", tmp_path, split="test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images, 2051))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:3], 2049))
    with pytest.raises(DatasetError, match="4 images but .* 3 labels"):
        load_dataset("mnist", tmp_path, split="test")
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels, 2049))[:-10])
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", tmp_path, split="test")
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte") as info:
        load_dataset("mnist", tmp_path, split="train")
    assert "MNIST/raw" in str(info.value)


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    test = load_dataset("fashion-mnist", split="test")  # default data_dir
    train = load_dataset("fashion-mnist", FASHION, split="train")
    assert len(test) == 10000 and len(train) == 60000
    assert test.images.shape == (10000, 28, 28, 1) and test.num_classes == 10
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    assert torch.equal(test.labels.bincount(), torch.full((10,), 1000))
    assert test.labels[:3].tolist() == [9, 2, 1]  # ankle boot, pullover, trouser


# ----------------------------------------------------------------------------- ImageNet


@pytest.mark.parametrize("nested", [True, False])
def test_imagenet_npz(tmp_path, nested):
    size = 32
    train_dir = tmp_path / "Imagenet32_train_npz" if nested else tmp_path
    val_dir = tmp_path / "Imagenet32_val_npz" if nested else tmp_path
    train_dir.mkdir(exist_ok=True)
    val_dir.mkdir(exist_ok=True)
    batches = [random_images(3, size, size) for _ in range(10)]
    for k, images in enumerate(batches, 1):
        data = channel_major(images)
        np.savez(train_dir / f"train_data_batch_{k}.npz", data=data, labels=[k, 1000, 1], mean=np.zeros(3072))
    val = random_images(4, size, size)
    np.savez(val_dir / "val_data.npz", data=channel_major(val), labels=np.array([1, 2, 3, 1000]))
    train = load_dataset("imagenet32", tmp_path, split="train")
    assert len(train) == 30 and train.num_classes == 1000
    assert torch.equal(train.images[27:30], torch.from_numpy(batches[9]))  # batch 10 sorted after 9, not after 1
    assert train.labels[:6].tolist() == [0, 999, 0, 1, 999, 0]
    for split in ("test", "valid"):
        ds = load_dataset("imagenet32", tmp_path, split=split)
        assert torch.equal(ds.images, torch.from_numpy(val)) and ds.labels.tolist() == [0, 1, 2, 999]
        assert ds.description == "ImageNet 32x32 (Chrabaszcz et al. npz version), valid split"


def test_imagenet64_npz_downsampled(tmp_path):
    images = random_images(2, 64, 64)
    np.savez(tmp_path / "val_data.npz", data=channel_major(images), labels=[5, 6])
    ds = load_dataset("imagenet64", tmp_path, split="test", image_size=(32, 32))
    assert torch.equal(ds.images, area_downsample(torch.from_numpy(images), (32, 32)))
    assert ds.description.startswith("ImageNet 64x64 (Chrabaszcz")


def test_imagenet_png_dir_and_tar(tmp_path):
    train, val = random_images(5, 32, 32), random_images(3, 32, 32)
    write_pngs(tmp_path / "train_32x32", train)
    write_pngs(tmp_path / "staging" / "valid_32x32", val)
    with tarfile.open(tmp_path / "valid_32x32.tar", "w") as tar:
        tar.add(tmp_path / "staging" / "valid_32x32", arcname="valid_32x32")
    ds = load_dataset("imagenet32", tmp_path, split="train")
    assert ds.images is None and len(ds) == 5 and ds.num_classes == 0
    image, label = ds[3]
    assert label == -1 and torch.equal(image, torch.from_numpy(train[3]))
    test = load_dataset("imagenet32", tmp_path, split="test")
    assert test.description == "ImageNet 32x32 (van den Oord et al. PNG version), valid split"
    batch, labels = test.get_batch([0, 1, 2])
    assert torch.equal(batch, torch.from_numpy(val)) and labels.tolist() == [-1, -1, -1]
    small = load_dataset("imagenet32", tmp_path, split="test", image_size=(16, 16), channels=1)
    assert torch.equal(small[1][0], area_downsample(torch.from_numpy(pil_gray(val[1:2])), (16, 16))[0])


def test_imagenet_missing_and_corrupt(tmp_path):
    with pytest.raises(DatasetError, match="ImageNet 64x64 train split not found") as info:
        load_dataset("imagenet64", tmp_path)
    assert "train_64x64" in str(info.value) and "Imagenet64_train_npz" in str(info.value)
    (tmp_path / "val_data.npz").write_bytes(b"not a zip file")
    with pytest.raises(DatasetError, match="val_data.npz"):
        load_dataset("imagenet32", tmp_path, split="test")
    with pytest.raises(ConfigError, match="unknown split"):
        load_dataset("imagenet32", tmp_path, split="validation")


# ----------------------------------------------------------------------------- CelebA


def test_celeba_splits_crop_and_resize(tmp_path):
    images_dir = write_celeba(tmp_path)
    train = load_dataset("celeba", tmp_path, split="train")
    assert len(train) == 3 and train.image_size == (218, 178) and train.num_classes == 0
    image, label = train[1]
    assert label == -1 and image.shape == (218, 178, 3)
    assert torch.equal(image, torch.from_numpy(np.array(Image.open(images_dir / "000002.jpg").convert("RGB"))))
    assert len(load_dataset("celeba", tmp_path, split="valid")) == 1
    test = load_dataset("celeba", tmp_path / "celeba", split="test", image_size=(64, 64))  # celeba/ itself
    assert len(test) == 2 and test[0][0].shape == (64, 64, 3)
    native = torch.from_numpy(np.array(Image.open(images_dir / "000005.jpg").convert("RGB")))
    assert torch.equal(test[0][0], area_downsample(native[20:198][None], (64, 64))[0])  # centre 178x178


def test_celeba_missing(tmp_path):
    with pytest.raises(DatasetError, match="celeba not found") as info:
        load_dataset("celeba", tmp_path)
    assert "img_align_celeba/" in str(info.value) and "list_eval_partition.txt" in str(info.value)
    images_dir = write_celeba(tmp_path)
    (images_dir / "000002.jpg").unlink()
    with pytest.raises(DatasetError, match="1 CelebA train images .* missing"):
        load_dataset("celeba", tmp_path, split="train")


def test_celeba_superres_protocol(tmp_path):
    write_celeba(tmp_path)
    ds = load_dataset("celeba", tmp_path, split="train")
    pairs = SuperResDataset(ds, (8, 8), celeba_protocol=True)
    target, source, label = pairs[0]
    assert target.shape == (32, 32, 3) and source.shape == (8, 8, 3) and label == -1
    crop = celeba_superres_crop(ds[0][0])
    assert crop.shape == (138, 138, 3) and torch.equal(crop, ds[0][0][40:178, 20:158])
    assert torch.equal(target, area_downsample(crop[None], (32, 32))[0])
    assert torch.equal(source, area_downsample(crop[None], (8, 8))[0])
    targets, sources, labels = pairs.get_batch([0, 2])
    assert targets.shape == (2, 32, 32, 3) and sources.shape == (2, 8, 8, 3) and torch.equal(targets[0], target)


def test_superres_pairs(tmp_path):
    images = torch.from_numpy(random_images(4, 32, 32))
    ds = ImageDataset(images, torch.arange(4), name="x", split="test", description="x", num_classes=4)
    pairs = SuperResDataset(ds, (8, 8))
    target, source, label = pairs[2]
    assert torch.equal(target, images[2]) and label == 2
    assert torch.equal(source, area_downsample(images[2:3], (8, 8))[0])
    assert pairs.image_size == (32, 32) and pairs.source_size == (8, 8) and len(pairs) == 4


# ----------------------------------------------------------------------------- folder


def test_folder_classes_and_holdout(tmp_path):
    for cls, n in (("dog", 12), ("cat", 9)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            ext = ".png" if i % 2 else ".bmp"
            Image.fromarray(random_images(1, 40, 20)[0]).save(tmp_path / cls / f"{i:02d}{ext}")
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    train = load_dataset("folder", tmp_path, split="train")
    test = load_dataset("folder", tmp_path, split="test")
    assert train.num_classes == 2 and train.class_names == ["cat", "dog"]
    assert len(train) + len(test) == 21 and len(test) == 2  # sorted positions 9 and 19
    assert test.reader.names.tolist() == ["dog/00.bmp", "dog/10.bmp"] and test.labels.tolist() == [1, 1]
    image, label = train[0]
    assert image.shape == (32, 32, 3) and label == 0  # default size; cat/00.bmp
    source = torch.from_numpy(np.array(Image.open(tmp_path / "cat" / "00.bmp")))
    assert torch.equal(image, resize_images(source[10:30][None], (32, 32))[0])  # centre 20x20, upsampled
    small = load_dataset("folder", tmp_path, split="train", image_size=(10, 10))
    assert torch.equal(small[0][0], area_downsample(source[10:30][None], (10, 10))[0])


def test_folder_explicit_splits_flat_gray_and_unreadable(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        (tmp_path / split).mkdir()
        for i in range(n):
            Image.fromarray(random_images(1, 16, 16, 1)[0, ..., 0]).save(tmp_path / split / f"{i}.png")
    (tmp_path / "train" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        train = load_dataset("folder", tmp_path, split="train", image_size=(16, 16))
    assert len(train) == 3 and train.num_classes == 0 and train.channels == 1 and train[0][1] == -1
    test = load_dataset("folder", tmp_path, split="test", image_size=(8, 8), channels=3)
    assert len(test) == 2 and test[1][0].shape == (8, 8, 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.png").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError, match="none of the train image files"):
            load_dataset("folder", empty, split="train")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("folder", tmp_path / "nowhere")


# ----------------------------------------------------------------------------- builtin


def test_builtin_deterministic_and_sized():
    a, la = builtin.make_shapes(64, (16, 16), seed=0)
    b, lb = builtin.make_shapes(64, (16, 16), seed=0)
    c, _ = builtin.make_shapes(64, (16, 16), seed=1)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    prefix, _ = builtin.make_shapes(10, (16, 16), seed=0)
    assert torch.equal(prefix, a[:10])  # image i depends only on (seed, stream, i)
    big, labels = builtin.make_shapes(300, (32, 32), seed=0)
    assert big.shape == (300, 32, 32, 3) and big.dtype == torch.uint8
    assert set(labels.tolist()) == set(range(len(builtin.KINDS)))
    # One shape on a background: strong contrast between the brightest and darkest pixels.
    luma = big.float().mean(-1).flatten(1)
    assert (luma.max(1).values - luma.min(1).values > 60).float().mean() > 0.95


def test_builtin_dataset_splits():
    train = load_dataset("builtin", split="train", image_size=(16, 16))
    test = load_dataset("builtin", split="test", image_size=(16, 16))
    assert (len(train), len(test)) == (20000, 2000) and train.num_classes == len(builtin.KINDS) >= 5
    assert train.images.shape == (20000, 16, 16, 3) and 0 <= train.labels.min() and train.labels.max() < 6
    seen = {bytes(im) for im in train.images.flatten(1).numpy()}
    # independent streams; with palette colours and crisp centred shapes a tiny image can repeat by
    # chance (20 of the 2000 test images at 16x16, none at 32x32)
    repeats = sum(bytes(im) in seen for im in test.images.flatten(1).numpy())
    assert repeats <= len(test) * 3 // 200
    default = load_dataset("builtin", split="test")
    assert default.image_size == (32, 32) and default.channels == 3
    gray = load_dataset("builtin", split="test", builtin_size=32, image_size=(16, 16), channels=1)
    assert gray.images.shape == (2000, 16, 16, 1)
    assert torch.equal(gray.images, area_downsample(torch.from_numpy(pil_gray(default.images.numpy())), (16, 16)))


def test_unknown_names_and_splits():
    assert "builtin" in DATASETS and "fashion-mnist" in DATASETS and len(DATASETS) == 9
    with pytest.raises(ConfigError, match="unknown data set"):
        load_dataset("svhn")
    with pytest.raises(ConfigError, match="unknown split 'valid' for cifar10"):
        load_dataset("cifar10", split="valid")
    with pytest.raises(DatasetError, match="channels"):
        load_dataset("builtin", channels=2)
