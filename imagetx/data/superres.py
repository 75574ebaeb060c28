"""Pairs for super-resolution: (high-res target, area-downsampled low-res source, label)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from imagetx.data.dataset import ImageDataset
from imagetx.data.transforms import area_downsample, resize_images

# Reference protocol (tensor2tensor, CelebA 8 -> 32): crop the aligned 218x178 face at (40, 20).
CELEBA_CROP = (40, 20, 138)  # top, left, side


def celeba_superres_crop(image: torch.Tensor) -> torch.Tensor:
    """uint8 (218, 178, C) -> uint8 (138, 138, C): rows 40..177, columns 20..157."""
    if tuple(image.shape[:2]) != (218, 178):
        raise ValueError(f"the CelebA super-resolution crop needs a native 218x178 image, got {tuple(image.shape)}")
    top, left, side = CELEBA_CROP
    return image[top : top + side, left : left + side]


class SuperResDataset(Dataset):
    """Items (target uint8 (H, W, C), source uint8 (h, w, C), label int); source = area mean of target.

    target_size: None keeps the wrapped data set's image size. celeba_protocol=True needs native
    CelebA items (218x178): each is cropped at (40, 20) to 138x138, then area-resized to target_size
    (default 32x32) and, independently, to source_size (e.g. 8x8).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        source_size: tuple[int, int],
        target_size: tuple[int, int] | None = None,
        celeba_protocol: bool = False,
    ):
        if celeba_protocol and tuple(dataset.image_size) != (218, 178):
            raise ValueError(
                f"celeba_protocol needs native 218x178 CelebA images (load with image_size=None), "
                f"got {dataset.image_size}"
            )
        if target_size is None:
            target_size = (32, 32) if celeba_protocol else dataset.image_size
        self.dataset = dataset
        self.celeba_protocol = celeba_protocol
        self.image_size = (int(target_size[0]), int(target_size[1]))
        self.source_size = (int(source_size[0]), int(source_size[1]))
        crop = CELEBA_CROP[2] if celeba_protocol else None
        limit = (crop, crop) if crop else self.image_size
        if not (0 < self.source_size[0] <= limit[0] and 0 < self.source_size[1] <= limit[1]):
            raise ValueError(f"source size {self.source_size} must not exceed {limit}")
        self.channels = dataset.channels
        self.num_classes = dataset.num_classes
        self.name = dataset.name
        self.split = dataset.split
        h, w = self.image_size
        sh, sw = self.source_size
        how = "crop (40, 20) 138x138, then " if celeba_protocol else ""
        self.description = f"{dataset.description}; super-resolution {how}{sh}x{sw} -> {h}x{w} (area)"

    def __len__(self) -> int:
        return len(self.dataset)

    def pair(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, H0, W0, C) items of the wrapped data set -> (target (B, H, W, C), source (B, h, w, C))."""
        if self.celeba_protocol:
            top, left, side = CELEBA_CROP
            crops = images[:, top : top + side, left : left + side]  # (B, 138, 138, C)
            return area_downsample(crops, self.image_size), area_downsample(crops, self.source_size)
        target = resize_images(images, self.image_size)
        return target, area_downsample(target, self.source_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, label = self.dataset[i]
        target, source = self.pair(image[None])
        return target[0], source[0], label

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (target uint8 (B, H, W, C), source uint8 (B, h, w, C), labels long (B,))."""
        images, labels = self.dataset.get_batch(indices)
        target, source = self.pair(images)
        return target, source, labels
