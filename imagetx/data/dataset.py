"""The data set classes every reader returns: in memory (one uint8 tensor) or lazy (a file list)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from imagetx.errors import DatasetError
from imagetx.data.transforms import center_crop_to_aspect, convert_channels, resize_images


GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def describe(base: str, split_label: str, native_size, image_size, native_channels, channels) -> str:
    """Human text for bits/dim reports, e.g. "CIFAR-10 32x32, resized to 16x16, test split"."""
    text = base
    if tuple(image_size) != tuple(native_size):
        text += f", resized to {image_size[0]}x{image_size[1]}"
    if channels != native_channels:
        text += ", converted to grayscale" if channels == 1 else ", converted to RGB"
    return f"{text}, {split_label} split"


class ImageDataset(Dataset):
    """A data set held in memory.

    images: uint8 (N, H, W, C) in [0, 255]; labels: long (N,) in [0, num_classes) or None.
    Items are (uint8 (H, W, C), int label), label -1 when unlabelled.
    """

    def __init__(
        self,
        images: torch.Tensor | None,
        labels: torch.Tensor | None,
        *,
        name: str,
        split: str,
        description: str,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        image_size: tuple[int, int] | None = None,
        channels: int | None = None,
    ):
        if images is not None:
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {tuple(images.shape)}")
            image_size, channels = tuple(images.shape[1:3]), images.shape[3]
        self.images = images
        self.labels = labels
        self.name = name
        self.split = split
        self.description = description
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = int(channels)

    def __len__(self) -> int:
        return self.images.shape[0]

    def _label(self, i: int) -> int:
        return int(self.labels[i]) if self.labels is not None else -1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self._label(i)

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """indices: sequence or long tensor (B,) -> (uint8 (B, H, W, C), long (B,), -1 if unlabelled)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self._batch_labels(idx)

    def _batch_labels(self, idx: torch.Tensor) -> torch.Tensor:
        if self.labels is None:
            return torch.full((len(idx),), -1, dtype=torch.long)
        return self.labels[idx]

    def __repr__(self) -> str:
        h, w = self.image_size
        return (
            f"{type(self).__name__}({self.description!r}, n={len(self)}, size={h}x{w}x{self.channels}, "
            f"classes={self.num_classes})"
        )


class DirReader:
    """Image files under a directory, addressed by index; picklable for DataLoader workers."""

    def __init__(self, root: str | os.PathLike, names: Sequence[str]):
        self.root = str(root)
        self.names = np.asarray(names, dtype=str)  # compact for 10^6 names

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return os.path.join(self.root, str(self.names[i]))

    def open(self, i: int) -> Image.Image:
        return Image.open(self.name(i))


class TarReader:
    """Members of an uncompressed tar archive, read by byte offset (no shared file handle, so
    DataLoader workers can read concurrently)."""

    def __init__(self, path: str | os.PathLike, names: Sequence[str], offsets: Sequence[int], sizes: Sequence[int]):
        self.path = str(path)
        self.names = np.asarray(names, dtype=str)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return f"{self.path}:{self.names[i]}"

    def open(self, i: int) -> Image.Image:
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            data = f.read(int(self.sizes[i]))
        return Image.open(io.BytesIO(data))


def pil_to_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    """PIL image of any mode -> uint8 (H, W, channels); RGB -> gray is Pillow's "L" (ITU-R 601-2)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    image = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy())


class LazyImageDataset(ImageDataset):
    """A data set decoded per item from image files (ImageNet PNG, CelebA, folders).

    Every item is decoded with Pillow, converted to `channels`, centre-cropped to the aspect ratio
    of image_size if crop_to_aspect, and resized (area when shrinking) to image_size.
    """

    def __init__(
        self,
        reader: DirReader | TarReader,
        labels: torch.Tensor | None,
        *,
        image_size: tuple[int, int],
        channels: int,
        crop_to_aspect: bool,
        **meta,
    ):
        super().__init__(None, labels, image_size=image_size, channels=channels, **meta)
        self.reader = reader
        self.crop_to_aspect = crop_to_aspect

    def __len__(self) -> int:
        return len(self.reader)

    def load_image(self, i: int) -> torch.Tensor:
        """-> uint8 (H, W, C) at image_size and channels."""
        try:
            with self.reader.open(i) as image:
                x = pil_to_tensor(image, self.channels)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"cannot decode image {self.reader.name(i)}: {exc}") from exc
        if tuple(x.shape[:2]) != self.image_size:
            if self.crop_to_aspect:
                x = center_crop_to_aspect(x, self.image_size)
            x = resize_images(x[None], self.image_size)[0]
        return x

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        return self.load_image(i), self._label(i)

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        images = [self.load_image(int(i)) for i in idx]
        h, w = self.image_size
        batch = torch.stack(images) if images else torch.empty((0, h, w, self.channels), dtype=torch.uint8)
        return batch, self._batch_labels(idx)


class StreamedImageDataset(ImageDataset):
    """A data set read once, in order, part by part: what the data cache converts from without
    holding a second whole copy (the npz version of ImageNet). chunks() yields uint8
    (n, H, W, C) at image_size and channels; items are not addressable."""

    def __init__(self, parts, labels: torch.Tensor, *, image_size, channels, **meta):
        super().__init__(None, labels, image_size=image_size, channels=channels, **meta)
        self.parts = parts

    def __len__(self) -> int:
        return len(self.labels)

    def chunks(self):
        for part in self.parts():
            yield resize_images(convert_channels(part, self.channels), self.image_size)

    def __getitem__(self, i):
        raise TypeError("a StreamedImageDataset is read in order with chunks(), not by index")

    get_batch = __getitem__


def _requested(native_size, native_channels, image_size, channels, base_description, split_label):
    """-> (image_size, channels, description) of a request, None meaning the native value."""
    image_size = tuple(image_size) if image_size is not None else tuple(native_size)
    channels = channels if channels is not None else native_channels
    return image_size, channels, describe(base_description, split_label, native_size, image_size, native_channels, channels)


def streamed(
    parts,
    labels: torch.Tensor,
    *,
    native_size: tuple[int, int],
    native_channels: int,
    base_description: str,
    split_label: str,
    image_size: tuple[int, int] | None,
    channels: int | None,
    **meta,
) -> StreamedImageDataset:
    """Wrap parts() (an iterator of native uint8 (n, H, W, C)) as in_memory would wrap their
    concatenation: the same images, labels and description. meta: name, split, num_classes,
    class_names."""
    image_size, channels, description = _requested(
        native_size, native_channels, image_size, channels, base_description, split_label
    )
    return StreamedImageDataset(parts, labels, image_size=image_size, channels=channels, description=description, **meta)


def in_memory(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    name: str,
    split: str,
    base_description: str,
    split_label: str,
    num_classes: int,
    image_size: tuple[int, int] | None,
    channels: int | None,
    class_names: Sequence[str] | None = None,
) -> ImageDataset:
    """Convert native uint8 (N, H, W, C) to the requested channels and size, and wrap it."""
    native_size, native_channels = tuple(images.shape[1:3]), images.shape[3]
    image_size, channels, description = _requested(
        native_size, native_channels, image_size, channels, base_description, split_label
    )
    images = resize_images(convert_channels(images, channels), image_size)
    return ImageDataset(
        images,
        labels,
        name=name,
        split=split,
        description=description,
        num_classes=num_classes,
        class_names=class_names,
    )


def lazy(
    reader: DirReader | TarReader,
    labels: torch.Tensor | None,
    *,
    native_size: tuple[int, int],
    native_channels: int,
    crop_to_aspect: bool,
    name: str,
    split: str,
    base_description: str,
    split_label: str,
    num_classes: int,
    image_size: tuple[int, int] | None,
    channels: int | None,
    class_names: Sequence[str] | None = None,
) -> LazyImageDataset:
    """Wrap a file list decoded per item at the requested size and channels (native when None)."""
    image_size, channels, description = _requested(
        native_size, native_channels, image_size, channels, base_description, split_label
    )
    return LazyImageDataset(
        reader,
        labels,
        image_size=image_size,
        channels=channels,
        crop_to_aspect=crop_to_aspect,
        name=name,
        split=split,
        description=description,
        num_classes=num_classes,
        class_names=class_names,
    )
