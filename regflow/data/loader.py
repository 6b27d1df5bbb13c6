"""Batches of (fixed, moving) pairs from a processed dataset: TorchIO subjects, augmentation, queue.

``build_dataloader`` serves DeepReg's six loaders (paired, unpaired, grouped; with or without
labels) from ``data/processed/<dataset>/manifest.json``. Which images pair up is decided by
:mod:`regflow.data.pairs`; this module reads the NIfTI files (with nibabel, so that tensors equal
the stored arrays, channels first, no reorientation), builds one ``tio.Subject`` per pair and
batches it.

Randomness: training item ``epoch * len(dataset) + i`` is pair ``i`` of an epoch whose pairing is
drawn from ``(seed, epoch)``; its augmentation draws from ``(seed, epoch, i)``. Each pass over the
DataLoader is the next epoch, so the same seed gives the same batches, epoch after epoch, whatever
the number of workers. Evaluation pairs are drawn once from the seed and are the same on every pass.

Augmentation (training only) follows DeepReg: the fixed and the moving side are each deformed by
their own random affine and elastic transform, an image always together with its own label, so that
labels stay on their anatomy; gamma and noise touch images only. TorchIO measures translation and
elastic displacement in mm and rotation in degrees. A random flip (``augment.flip``, as LapIRN and
Estienne et al. trained) mirrors the whole pair alike, so the registration task stays the same
task, seen in a mirror.

Labels arrive as multi-channel binary float32, one channel per foreground label. With
``sample_label: stack`` the batch carries every channel and ``label_index = -1``; with ``sample``
or ``all`` it carries the one channel ``label_index`` (shape ``(B, 1, ...)``), the same channel on
the fixed and the moving side.

Patch mode (``loader.patch.size``): training pairs go through a ``tio.Queue`` of uniformly sampled
patches, loaded by ``loader.num_workers`` queue workers behind a 0-worker DataLoader. A patch's
``fixed_affine`` is the affine of the patch (the file's affine with the origin moved to the patch
corner). Evaluation always serves whole volumes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torchio as tio
from torch.utils.data import DataLoader, Dataset, Sampler

from regflow.config import AugmentConfig, Config
from regflow.data.io import read_volume, volume_shape
from regflow.data.manifest import Case, Manifest
from regflow.data.pairs import (
    STACK,
    LabelItem,
    Pair,
    all_group_pairs,
    grouped_pairs,
    label_items,
    paired_pairs,
    unpaired_pairs,
)
from regflow.errors import ConfigError, DataError

SIDES = ("fixed", "moving")


def label_to_channels(label: np.ndarray, label_format: str,
                      label_values: Sequence[int] | None = None) -> np.ndarray:
    """Turn a stored label into channels first.

    Args:
        label: an integer map ``(D, H, W)``, or channels-last ``(D, H, W, L)`` binary or soft.
        label_format: ``integer``, ``channels`` or ``soft``.
        label_values: for integer maps, the foreground value of each channel, in channel order.

    Returns:
        ``(L, D, H, W)`` float32: in {0, 1} (channel ``c`` of an integer map is
        ``label == label_values[c]``), or the soft labels' values in [0, 1] unchanged.
    """
    if label_format == "integer":
        return np.stack([label == value for value in label_values]).astype(np.float32)
    if label_format == "soft":
        return np.moveaxis(label, -1, 0).astype(np.float32)
    return np.moveaxis(label > 0, -1, 0).astype(np.float32)


def _read_nifti(path: Path, shape: Sequence[int], channels: bool) -> tuple[np.ndarray, np.ndarray]:
    """Array (as stored) and affine of a NIfTI file whose spatial shape must be ``shape``."""
    array, affine = read_volume(path)
    spatial = array.shape[:-1] if channels else array.shape
    if tuple(spatial) != tuple(shape) or (channels and array.ndim != len(shape) + 1):
        raise DataError(f"{path}: shape {list(array.shape)} does not match the manifest's "
                        f"{list(shape)}")
    return array, affine


def build_augmentation(augment: AugmentConfig, ndim: int = 3) -> tio.Compose | None:
    """The training augmentation of a pair subject, or ``None`` when there is none to apply.

    Args:
        augment: ``loader.augment`` of the config.
        ndim: 2 or 3; 2-D images (stored with a trailing axis of 1) are kept in their plane.

    Returns:
        A transform of a subject with ``fixed_image``/``moving_image`` (and ``fixed_label``/
        ``moving_label``): a random flip of the whole pair; per side one random affine and one
        elastic deformation shared by the image and its label; then random gamma and noise on the
        images.
    """
    if not augment.enabled:
        return None
    transforms: list[tio.Transform] = []
    flip_axes = tuple(axis for axis in augment.flip.axes if axis < ndim)
    if augment.flip.enabled and flip_axes:
        transforms.append(tio.RandomFlip(axes=flip_axes, flip_probability=0.5))
    in_plane = (1, 1, 1, 1, 0, 0) if ndim == 2 else (1,) * 6
    for side in SIDES:
        keys = [f"{side}_image", f"{side}_label"]
        if augment.affine.enabled:
            transforms.append(tio.RandomAffine(
                scales=augment.affine.scales, degrees=augment.affine.degrees,
                translation=tuple(augment.affine.translation * k for k in in_plane),
                include=keys))
        if augment.elastic.enabled:
            transforms.append(tio.RandomElasticDeformation(
                num_control_points=augment.elastic.control_points,
                max_displacement=augment.elastic.max_displacement, include=keys))
    images = [f"{side}_image" for side in SIDES]
    if augment.intensity.enabled and augment.intensity.log_gamma > 0:
        transforms.append(tio.RandomGamma(log_gamma=augment.intensity.log_gamma, include=images))
    if augment.intensity.enabled and augment.intensity.noise_std > 0:
        transforms.append(tio.RandomNoise(std=(0, augment.intensity.noise_std), include=images))
    return tio.Compose(transforms) if transforms else None


def _seed(*numbers: int) -> int:
    """A 63-bit torch seed mixed from several integers."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(2, np.uint64)[0] >> 1)


class PairDataset(Dataset):
    """The pairs of one split of a processed dataset, as TorchIO subjects.

    Item ``key`` is pair ``key % len(self)`` of epoch ``key // len(self)`` (evaluation pairs do not
    depend on the epoch). Subjects hold ``fixed_image``, ``moving_image`` (``tio.ScalarImage``,
    ``(1, *S)``), ``fixed_label``, ``moving_label`` (``tio.LabelMap``, ``(L, *S)``, when the
    dataset has labels) and ``fixed_id``, ``moving_id``, ``label_index``. 2-D data carry a trailing
    spatial axis of 1, as TorchIO expects.

    Args:
        manifest_path: ``data/processed/<dataset>/manifest.json``.
        split: ``train``, ``val`` or ``test``.
        config: the whole config (``seed`` and ``loader``).
        train: random pairs each epoch and augmentation (if enabled), else fixed pairs.

    Raises:
        DataError: a bad manifest, a split without cases, a case without its group or label.
    """

    def __init__(self, manifest_path: str | Path, split: str, config: Config, train: bool):
        self.manifest_path = Path(manifest_path)
        manifest = Manifest.read(self.manifest_path)
        self.root = self.manifest_path.parent
        self.pairing: str = manifest.pairing
        self.shape: list[int] = list(manifest.shape)
        self.label_format: str | None = manifest.label_format
        self.label_values: list[int] | None = manifest.label_values
        self.cases = manifest.split_cases(split, config.loader.fold)
        if not self.cases:
            raise DataError(f"{self.manifest_path}: no cases in split {split!r}")
        self.seed = config.seed
        self.loader = config.loader
        self.train = train
        self._volumes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # evaluation scores every label: "sample" (a training choice) becomes "all"
        sample_label = config.loader.sample_label
        self.sample_label = "all" if sample_label == "sample" and not train else sample_label
        augment = build_augmentation(config.loader.augment, len(self.shape))
        self.transform = augment if train else None
        sides = SIDES if self.pairing == "paired" else ("fixed",)
        counts = {case_id: {side: self._count_labels(case_id, side) for side in sides}
                  for case_id in self.cases}
        self._label_counts = {(case_id, side): counts[case_id].get(side, counts[case_id]["fixed"])
                              for case_id in self.cases for side in SIDES}
        self.num_labels = max(self._label_counts.values())
        self._cached: tuple[int, list[LabelItem]] | None = None
        self._length = len(self.items(0))
        if self._length == 0:
            raise DataError(f"{self.manifest_path}: split {split!r} gives no pairs")

    def _files(self, case: Case, side: str) -> tuple[str, str | None]:
        return case.files(side, self.pairing == "paired")

    def _read(self, relative_path: str, channels: bool) -> tuple[np.ndarray, np.ndarray]:
        """A processed volume and its affine, decoded once per dataset when caching is on.

        Processed datasets are small (a 48x64x48 float32 volume is 0.6 MB), and decoding the same
        .nii.gz at every epoch would cost more than the training step on a CPU.
        """
        cached = self._volumes.get(relative_path)
        if cached is None:
            cached = _read_nifti(self.root / relative_path, self.shape, channels)
            if self.loader.cache_volumes:
                self._volumes[relative_path] = cached
        return cached

    def _count_labels(self, case_id: str, side: str) -> int:
        """Label channels of one image (0 without labels)."""
        if self.label_format is None:
            return 0
        if self.label_format == "integer":
            return len(self.label_values)
        label = self._files(self.cases[case_id], side)[1]
        if label is None:
            raise DataError(f"{self.manifest_path}: case {case_id!r} has no {side} label")
        return volume_shape(self.root / label)[-1]

    def _pair_label_counts(self, pairs: Sequence[Pair]) -> list[int]:
        """Label channels both images of each pair have."""
        return [min(self._label_counts[(fixed, "fixed")], self._label_counts[(moving, "moving")])
                for fixed, moving in pairs]

    def pairs(self, epoch: int = 0) -> tuple[list[Pair], np.random.Generator]:
        """The ``(fixed_id, moving_id)`` pairs of an epoch and the generator that drew them."""
        rng = np.random.default_rng([self.seed, epoch] if self.train else [self.seed])
        ids = sorted(self.cases)
        count = None if self.train else self.loader.eval_pairs
        if self.pairing == "paired":
            return paired_pairs(ids, rng if self.train else None), rng
        if self.pairing == "unpaired":
            return unpaired_pairs(ids, rng, count), rng
        groups: dict[str, list[str]] = {}
        for case_id in ids:
            group = self.cases[case_id].group
            if group is None:
                raise DataError(f"{self.manifest_path}: grouped case {case_id!r} has no group")
            groups.setdefault(str(group), []).append(case_id)
        if self.loader.group_pairs == "all":
            pairs = all_group_pairs(groups, self.loader.intra_group_option)
            return ([pairs[k] for k in rng.permutation(len(pairs))] if self.train else pairs), rng
        return grouped_pairs(groups, rng, self.loader.intra_group_prob,
                             self.loader.intra_group_option, count), rng

    def items(self, epoch: int) -> list[LabelItem]:
        """The ``(fixed_id, moving_id, label_index)`` items of an epoch, in batch order."""
        epoch = epoch if self.train else 0
        if self._cached is None or self._cached[0] != epoch:
            pairs, rng = self.pairs(epoch)
            self._cached = epoch, label_items(pairs, self._pair_label_counts(pairs),
                                              self.sample_label, rng)
        return self._cached[1]

    def __len__(self) -> int:
        return self._length

    def _side(self, case_id: str, side: str, label_index: int,
              affine: np.ndarray | None) -> dict[str, tio.Image]:
        """Image (and label) of one side of a pair, as TorchIO images ``(C, *S[, 1])``.

        ``affine``: the grid to place them on (the fixed image's); ``None``: the file's own.
        """
        image_file, label_file = self._files(self.cases[case_id], side)
        image, file_affine = self._read(image_file, channels=False)
        affine = file_affine if affine is None else affine
        trailing = (1,) if len(self.shape) == 2 else ()
        tensor = torch.from_numpy(image.astype(np.float32).reshape(1, *image.shape, *trailing))
        images = {f"{side}_image": tio.ScalarImage(tensor=tensor, affine=affine)}
        if self.label_format is None:
            return images
        if label_file is None:
            raise DataError(f"{self.manifest_path}: case {case_id!r} has no {side} label")
        label, _ = self._read(label_file, channels=self.label_format != "integer")
        channels = label_to_channels(label, self.label_format, self.label_values)
        if label_index == STACK and channels.shape[0] != self.num_labels:
            raise DataError(f"{self.root / label_file}: {channels.shape[0]} label channels where "
                            f"others have {self.num_labels}; stacking needs the same labels in "
                            "every image: set loader.sample_label to sample or all")
        if label_index != STACK:
            channels = channels[label_index:label_index + 1]
        tensor = torch.from_numpy(channels.reshape(*channels.shape, *trailing))
        # soft labels are resampled linearly by augmentation (a LabelMap would take nearest)
        kind = tio.ScalarImage if self.label_format == "soft" else tio.LabelMap
        images[f"{side}_label"] = kind(tensor=tensor, affine=affine)
        return images

    def subject(self, fixed_id: str, moving_id: str, label_index: int = STACK) -> tio.Subject:
        """The un-augmented subject of one pair (``label_index``: one channel, or -1 for all).

        Every image of the subject carries the fixed image's affine: registration maps voxels of
        the moving grid onto the fixed grid, and TorchIO's patch samplers need one space.
        """
        fields: dict[str, Any] = {"fixed_id": fixed_id, "moving_id": moving_id,
                                  "label_index": label_index,
                                  "soft_labels": self.label_format == "soft"}
        fields.update(self._side(fixed_id, "fixed", label_index, affine=None))
        fixed_affine = fields["fixed_image"].affine
        fields.update(self._side(moving_id, "moving", label_index, affine=fixed_affine))
        return tio.Subject(fields)

    def __getitem__(self, key: int) -> tio.Subject:
        epoch, index = divmod(int(key), self._length)
        subject = self.subject(*self.items(epoch)[index])
        if self.transform is None:
            return subject
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, epoch, index))
            return self.transform(subject)


class EpochSampler(Sampler[int]):
    """Yields the item keys of one epoch per pass, ``epoch * length + i``; each pass is the next.

    Under DDP each of ``world_size`` ranks takes every ``world_size``-th key from ``rank`` on; the
    epoch is padded by wrapping around so that every rank gets the same number of items. With
    ``B`` items per rank and batch, the ``k``-th batches of all ranks together hold exactly the
    items of the ``k``-th batch of one process with batch ``B x world_size`` (in another order),
    so a data-parallel step sees what a single-process step would; only in an epoch whose length
    is not a multiple of ``B x world_size`` does the last step differ (wrapped padding on the
    ranks, a short batch in one process).
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.length = length
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.length / self.world_size)

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.length
        self.epoch += 1
        padded = [start + i % self.length for i in range(len(self) * self.world_size)]
        return iter(padded[self.rank::self.world_size])


class PatchQueue(tio.Queue):
    """A ``tio.Queue`` over a :class:`PairDataset` whose patch draws are seeded.

    TorchIO draws patch positions and the patch shuffle from torch's global generator in the main
    process; each fill here draws from ``(seed, fill number)`` instead, so a seed fixes the patches.
    """

    def __init__(self, dataset: PairDataset, sampler: EpochSampler, patch_size: Sequence[int],
                 samples_per_volume: int, queue_length: int, num_workers: int, seed: int):
        self.seed = seed
        self.fills = 0
        super().__init__(dataset, max_length=queue_length, samples_per_volume=samples_per_volume,
                         sampler=tio.UniformSampler(patch_size), subject_sampler=sampler,
                         num_workers=num_workers, shuffle_subjects=False, shuffle_patches=True)

    @property
    def iterations_per_epoch(self) -> int:
        """Patches per epoch, which ``len(queue)`` (and so ``len(DataLoader)``) returns.

        Overrides TorchIO's, which walks the subject sampler (advancing an :class:`EpochSampler`
        by an epoch) over ``dry_iter()``, a method a :class:`PairDataset` does not have.
        """
        return len(self.subject_sampler) * self.samples_per_volume

    def _fill(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, self.fills))
            self.fills += 1
            super()._fill()


def collate_pairs(subjects: Sequence[tio.Subject]) -> dict[str, Any]:
    """Batch pair subjects into the loader's batch dict.

    Returns:
        ``fixed_image``, ``moving_image``: (B, 1, *S) float32; ``fixed_label``, ``moving_label``:
        (B, L, *S) float32 in {0, 1} (when present); ``fixed_id``, ``moving_id``: list[str];
        ``fixed_affine``: (B, 4, 4) float64 voxel-to-world (mm); ``label_index``: (B,) long.
        2-D subjects (trailing spatial axis 1) give (B, C, H, W).
    """
    first = subjects[0]
    squeeze = first["fixed_image"].data.shape[-1] == 1
    batch: dict[str, Any] = {}
    for key in ("fixed_image", "moving_image", "fixed_label", "moving_label"):
        if key not in first:
            continue
        data = torch.stack([subject[key].data for subject in subjects]).float()
        if key.endswith("label") and not first["soft_labels"]:
            data = (data > 0.5).float()  # resampled labels: back to exact {0, 1}
        batch[key] = data[..., 0] if squeeze else data
    batch["fixed_id"] = [subject["fixed_id"] for subject in subjects]
    batch["moving_id"] = [subject["moving_id"] for subject in subjects]
    batch["fixed_affine"] = torch.as_tensor(
        np.stack([subject["fixed_image"].affine for subject in subjects]), dtype=torch.float64)
    batch["label_index"] = torch.tensor([subject["label_index"] for subject in subjects],
                                        dtype=torch.long)
    return batch


def build_dataloader(manifest_path: str | Path, split: str, config: Config,
                     train: bool) -> DataLoader:
    """The DataLoader of one split; every pass over it is one epoch.

    Args:
        manifest_path: ``data/processed/<dataset>/manifest.json``.
        split: ``train``, ``val`` or ``test``.
        config: uses ``seed`` and ``loader`` (batch size, workers, label sampling, grouping,
            ``eval_pairs``, augmentation, patches).
        train: a new random pairing each epoch, augmentation and patches when configured, and
            under ``torch.distributed`` each rank its share of the epoch (see
            :class:`EpochSampler`; ``loader.batch_size`` is per rank, so the global batch is
            ``batch_size x world size``); otherwise the fixed evaluation pairs of
            :func:`pair_list` (all of them on every rank), whole volumes, no augmentation.

    Returns:
        A DataLoader of batch dicts (see :func:`collate_pairs`).

    Raises:
        DataError: bad manifest or files.
        ConfigError: ``loader.patch.size`` does not fit the dataset's shape.
    """
    dataset = PairDataset(manifest_path, split, config, train)
    sharded = train and dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    sampler = EpochSampler(len(dataset), rank, world_size)
    loader = config.loader
    if train and loader.patch.size is not None:
        size = list(loader.patch.size)
        fits = len(size) == len(dataset.shape) and all(
            p <= s for p, s in zip(size, dataset.shape, strict=True))
        if not fits:
            raise ConfigError(f"loader.patch.size: {size} does not fit the volume shape "
                              f"{dataset.shape}")
        patch_size = size + [1] * (3 - len(size))
        queue = PatchQueue(dataset, sampler, patch_size, loader.patch.samples_per_volume,
                           loader.patch.queue_length, loader.num_workers, config.seed)
        return DataLoader(queue, batch_size=loader.batch_size, num_workers=0,
                          collate_fn=collate_pairs)
    return DataLoader(dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=collate_pairs)


def steps_per_epoch(manifest_path: str | Path, config: Config, world_size: int = 1) -> int:
    """Optimiser steps in one training epoch (what :func:`build_dataloader` yields per pass).

    ``ceil(ceil(items / world_size) x patches / batch_size)``: ``items`` the training pairs of an
    epoch (times their labels under ``sample_label: all``), ``patches`` the
    ``loader.patch.samples_per_volume`` in patch mode, else 1.
    """
    items = math.ceil(len(PairDataset(manifest_path, "train", config, True)) / world_size)
    if config.loader.patch.size is not None:
        items *= config.loader.patch.samples_per_volume
    return math.ceil(items / config.loader.batch_size)


def pair_list(manifest_path: str | Path, split: str, config: Config) -> list[Pair]:
    """The ``(fixed_id, moving_id)`` evaluation pairs of a split, in batch order.

    With ``sample_label: all`` each pair appears in the batches once per label channel.
    """
    return PairDataset(manifest_path, split, config, train=False).pairs()[0]
