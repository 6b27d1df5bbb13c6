"""Loader batches: the right files in the right slots, seeded randomness, augmentation, patches."""

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from regflow.config import Config
from regflow.data.loader import EpochSampler, build_dataloader, label_to_channels, pair_list
from regflow.data.manifest import Manifest
from regflow.errors import ConfigError, DataError

PAIRINGS = ["paired", "unpaired", "grouped"]
STRONG_AUGMENT = {
    "enabled": True,
    "affine": {"scales": 0.1, "degrees": 30.0, "translation": 3.0},
    "elastic": {"control_points": 5, "max_displacement": 1.5},
    "intensity": {"enabled": False},
}


SHAPE = (12, 14, 10)  # the synthetic fixture's default shape


def make_config(seed: int = 0, augment: dict | None = None, **loader) -> Config:
    loader["augment"] = augment or {"enabled": False}
    return Config.model_validate({"seed": seed, "loader": loader})


def epochs(loader, count: int = 1) -> list[list[dict]]:
    with warnings.catch_warnings():  # elastic folding warnings on tiny volumes
        warnings.simplefilter("ignore", RuntimeWarning)
        return [list(loader) for _ in range(count)]


def pairs_of(batches: list[dict]) -> list[tuple[str, str]]:
    return [pair for b in batches for pair in zip(b["fixed_id"], b["moving_id"], strict=True)]


def file_of(manifest: Path, case_id: str, side: str, paired: bool) -> Path:
    return manifest.parent / (f"{side}_images" if paired else "images") / f"{case_id}.nii.gz"


def assert_batch_is_its_files(synthetic, batch: dict, manifest: Path, paired: bool,
                              labelled: bool):
    """Every image/label/affine in the batch is exactly what the named cases' files hold."""
    size = len(batch["fixed_id"])
    assert batch["fixed_image"].shape == (size, 1, *SHAPE)
    assert batch["fixed_image"].dtype == torch.float32
    assert batch["fixed_affine"].dtype == torch.float64
    for b, (fixed, moving) in enumerate(zip(batch["fixed_id"], batch["moving_id"], strict=True)):
        moving_side = "moving" if paired else "fixed"  # unpaired files are generated as "fixed"
        np.testing.assert_array_equal(batch["fixed_image"][b, 0], synthetic.image(fixed))
        np.testing.assert_array_equal(batch["moving_image"][b, 0],
                                      synthetic.image(moving, moving_side))
        np.testing.assert_array_equal(batch["fixed_affine"][b],
                                      nib.load(file_of(manifest, fixed, "fixed", paired)).affine)
        np.testing.assert_array_equal(batch["fixed_affine"][b], synthetic.affine(fixed, "fixed"))
        if not labelled:
            assert "fixed_label" not in batch and batch["label_index"][b] == -1
            continue
        index = int(batch["label_index"][b])
        channels = slice(None) if index == -1 else slice(index, index + 1)
        for key, case_id, side in (("fixed_label", fixed, "fixed"),
                                   ("moving_label", moving, moving_side)):
            assert batch[key].dtype == torch.float32
            expected = synthetic.label_channels(case_id, side)[channels]
            np.testing.assert_array_equal(batch[key][b], expected)


@pytest.mark.parametrize("label_format", [None, "integer", "channels"])
@pytest.mark.parametrize("pairing", PAIRINGS)
def test_six_loaders_put_each_cases_files_in_its_slots(synthetic, make_dataset, pairing,
                                                       label_format):
    manifest = make_dataset(pairing, label_format)
    config = make_config(batch_size=2, eval_pairs=5)
    paired = pairing == "paired"
    train = epochs(build_dataloader(manifest, "train", config, train=True), 2)
    val = epochs(build_dataloader(manifest, "val", config, train=False))[0]
    for batch in [*train[0], *train[1], *val]:
        assert_batch_is_its_files(synthetic, batch, manifest, paired, label_format is not None)
    assert all(int(synthetic.case_number(f)) < 9 for f, _ in pairs_of(train[0]))  # train split only
    expected_train = {"paired": 6, "unpaired": 3, "grouped": 3}[pairing]
    assert len(pairs_of(train[0])) == len(pairs_of(train[1])) == expected_train
    assert pairs_of(val) == pair_list(manifest, "val", config)
    if paired:
        assert all(f == m for f, m in pairs_of(train[0]))
        assert pairs_of(val) == [(f"case{k:03d}",) * 2 for k in range(6, 10)]
    else:
        assert all(f != m for f, m in pairs_of(train[0]) + pairs_of(val))


def test_label_to_channels_maps_values_in_order_and_moves_channels_first():
    integer = np.array([[0, 5], [3, 5]], np.uint8)
    np.testing.assert_array_equal(label_to_channels(integer, "integer", [5, 3]),
                                  [[[0, 1], [0, 1]], [[0, 0], [1, 0]]])
    channels_last = np.zeros((2, 3, 4), np.uint8)
    channels_last[1, 2, 3] = 1
    result = label_to_channels(channels_last, "channels")
    assert result.shape == (4, 2, 3) and result.dtype == np.float32
    assert result[3, 1, 2] == 1 and result.sum() == 1


def test_epoch_sampler_moves_on_each_pass_and_shards_ranks_evenly():
    sampler = EpochSampler(3)
    assert [list(sampler) for _ in range(2)] == [[0, 1, 2], [3, 4, 5]]
    ranks = [EpochSampler(5, rank, 2) for rank in (0, 1)]
    assert [len(r) for r in ranks] == [3, 3]
    assert [list(r) for r in ranks] == [[0, 2, 4], [1, 3, 0]]
    assert [list(r) for r in ranks] == [[5, 7, 9], [6, 8, 5]]


def test_unpaired_training_pairs_change_every_epoch_and_never_pair_a_case_with_itself(
        make_dataset):
    manifest = make_dataset("unpaired", None)
    loader = build_dataloader(manifest, "train", make_config(batch_size=3), train=True)
    pairings = [pairs_of(batches) for batches in epochs(loader, 6)]
    assert all(f != m for pairs in pairings for f, m in pairs)
    assert len({tuple(pairs) for pairs in pairings}) >= 5
    assert all(len({c for pair in pairs for c in pair}) == 6 for pairs in pairings)


def test_evaluation_pairs_are_fixed_by_the_seed(make_dataset):
    manifest = make_dataset("unpaired", None)
    config = make_config(seed=3, eval_pairs=7)
    loader = build_dataloader(manifest, "val", config, train=False)
    first, second = (pairs_of(batches) for batches in epochs(loader, 2))
    assert first == second == pair_list(manifest, "val", config)
    assert len(set(first)) == 7
    assert pair_list(manifest, "val", make_config(seed=4, eval_pairs=7)) != first


@pytest.mark.parametrize(("option", "earlier_moves"), [("forward", True), ("backward", False)])
def test_grouped_intra_group_pairs_follow_the_order_option(synthetic, make_dataset, option,
                                                           earlier_moves):
    manifest = make_dataset("grouped", None)
    loader = build_dataloader(manifest, "train", make_config(intra_group_prob=1.0,
                                                             intra_group_option=option), True)
    pairs = [pair for batches in epochs(loader, 5) for pair in pairs_of(batches)]
    assert all(f.split("-")[0] == m.split("-")[0] for f, m in pairs)
    number = synthetic.case_number
    assert all((number(m) < number(f)) == earlier_moves for f, m in pairs)



def test_grouped_pairs_all_evaluates_every_intra_group_pair_and_trains_on_them(make_dataset):
    manifest = make_dataset("grouped", None)  # val: 2 groups of 2, train: 3 groups of 3
    config = make_config(group_pairs="all", eval_pairs=1)
    val = pairs_of(epochs(build_dataloader(manifest, "val", config, False))[0])
    assert val == pair_list(manifest, "val", config) == [
        ("g0-case010", "g0-case009"), ("g1-case012", "g1-case011")]
    train = build_dataloader(manifest, "train", config, True)
    first, second = (pairs_of(batches) for batches in epochs(train, 2))
    assert sorted(first) == sorted(second) and first != second  # every pair, a new order
    assert len(first) == 3 * 3  # 3 forward pairs in each of the 3 groups

def test_grouped_inter_group_pairs_cross_groups(make_dataset):
    manifest = make_dataset("grouped", None)
    loader = build_dataloader(manifest, "train", make_config(intra_group_prob=0.0), True)
    pairs = [pair for batches in epochs(loader, 5) for pair in pairs_of(batches)]
    assert all(f.split("-")[0] != m.split("-")[0] for f, m in pairs)
    assert sorted({m.split("-")[0] for m in dict(pairs).values()}) == ["g0", "g1", "g2"]


def batches_as_arrays(batches: list[dict]) -> list:
    return [(b["fixed_id"], b["moving_id"], b["fixed_image"].numpy(), b["moving_label"].numpy())
            for b in batches]


def test_same_seed_same_augmented_batches_any_workers_other_seed_differs(synthetic, make_dataset):
    manifest = make_dataset("unpaired", "integer")
    augment = STRONG_AUGMENT | {"intensity": {"log_gamma": 0.3, "noise_std": 0.5}}

    def run(seed: int, workers: int) -> list:
        loader = build_dataloader(manifest, "train", make_config(seed, augment, batch_size=3,
                                                                 num_workers=workers), True)
        return [batches_as_arrays(batches) for batches in epochs(loader, 2)]

    first = run(7, 0)
    for repeat in (run(7, 0), run(7, 2)):
        for epoch_a, epoch_b in zip(first, repeat, strict=True):
            for a, b in zip(epoch_a, epoch_b, strict=True):
                assert a[:2] == b[:2]
                np.testing.assert_array_equal(a[2], b[2])
                np.testing.assert_array_equal(a[3], b[3])
    fixed, moving, images, _ = first[0][0]
    assert not np.allclose(images[0, 0], synthetic.image(fixed[0]))  # augmentation did act
    other = run(8, 0)
    assert not all(np.array_equal(a[2], b[2]) for a, b in zip(first[0], other[0], strict=True))


def test_augmentation_moves_each_label_with_its_image(synthetic, make_dataset):
    manifest = make_dataset("paired", "integer")
    loader = build_dataloader(manifest, "train", make_config(1, STRONG_AUGMENT), True)
    dices, moved = [], []
    for batch in [b for batches in epochs(loader, 3) for b in batches]:
        for b, case_id in enumerate(batch["fixed_id"]):
            for s, side in enumerate(("fixed", "moving")):
                base = 10 * (synthetic.case_number(case_id) + 1) + 5 * s
                image_cube = batch[f"{side}_image"][b, 0] > base + 50
                label_cube = batch[f"{side}_label"][b].amax(0) > 0
                overlap = (image_cube & label_cube).sum().item()
                dices.append(2 * overlap / (image_cube.sum() + label_cube.sum()).item())
                original = synthetic.label_channels(case_id, side).max(0) > 0
                moved.append((label_cube.numpy() != original).mean())
    assert min(dices) > 0.8
    assert np.mean(moved) > 0.02  # the labels did move


def test_fixed_and_moving_sides_are_augmented_independently(synthetic, make_dataset):
    manifest = make_dataset("unpaired", "integer")
    loader = build_dataloader(manifest, "train", make_config(2, STRONG_AUGMENT), True)
    batch = epochs(loader)[0][0]
    shifts = [batch[f"{side}_label"][0].numpy() - synthetic.label_channels(batch[f"{side}_id"][0])
              for side in ("fixed", "moving")]
    assert not np.array_equal(*shifts)


def test_sample_label_sample_gives_one_matching_channel_per_pair(synthetic, make_dataset):
    manifest = make_dataset("unpaired", "channels")
    loader = build_dataloader(manifest, "train", make_config(sample_label="sample",
                                                             batch_size=3), True)
    batches = [b for batches in epochs(loader, 4) for b in batches]
    for batch in batches:
        assert batch["fixed_label"].shape == (3, 1, *SHAPE)
        assert_batch_is_its_files(synthetic, batch, manifest, paired=False, labelled=True)
    assert {int(i) for b in batches for i in b["label_index"]} == {0, 1}


def test_sample_label_all_gives_every_channel_of_every_pair(synthetic, make_dataset):
    manifest = make_dataset("grouped", "integer")
    config = make_config(sample_label="all", batch_size=4, eval_pairs=3)
    batches = epochs(build_dataloader(manifest, "val", config, False))[0]
    items = [(f, m, int(i)) for b in batches
             for f, m, i in zip(b["fixed_id"], b["moving_id"], b["label_index"], strict=True)]
    pairs = pair_list(manifest, "val", config)
    assert items == [(f, m, c) for f, m in pairs for c in (0, 1)]
    for batch in batches:
        assert_batch_is_its_files(synthetic, batch, manifest, paired=False, labelled=True)


def test_patch_mode_serves_seeded_patches_cut_from_the_files(synthetic, make_dataset):
    manifest = make_dataset("paired", "integer")
    config = make_config(5, batch_size=4, patch={"size": [8, 6, 4], "samples_per_volume": 2,
                                                  "queue_length": 6})
    loader = build_dataloader(manifest, "train", config, True)
    assert len(loader) == 3  # 6 pairs * 2 patches / batch 4
    first = epochs(loader, 2)
    again = epochs(build_dataloader(manifest, "train", config, True), 2)
    for a, b in zip(first[0] + first[1], again[0] + again[1], strict=True):
        assert a["fixed_id"] == b["fixed_id"]
        assert torch.equal(a["fixed_image"], b["fixed_image"])
    for batch in first[0]:
        assert batch["fixed_image"].shape == (4, 1, 8, 6, 4)
        assert batch["moving_label"].shape == (4, 2, 8, 6, 4)
        for b, case_id in enumerate(batch["fixed_id"]):
            full = synthetic.affine(case_id, "fixed")
            corner = np.round((batch["fixed_affine"][b][:3, 3].numpy() - full[:3, 3])
                              / np.diag(full)[:3]).astype(int)
            crop = tuple(slice(c, c + n) for c, n in zip(corner, (8, 6, 4), strict=True))
            moving_label = synthetic.label_channels(case_id, "moving")[(slice(None), *crop)]
            np.testing.assert_array_equal(batch["fixed_image"][b, 0],
                                          synthetic.image(case_id)[crop])
            np.testing.assert_array_equal(batch["moving_image"][b, 0],
                                          synthetic.image(case_id, "moving")[crop])
            np.testing.assert_array_equal(batch["moving_label"][b], moving_label)


def test_two_dimensional_data_batch_as_b_c_h_w(synthetic, make_dataset):
    manifest = make_dataset("unpaired", "integer", shape=(12, 14))
    batch = epochs(build_dataloader(manifest, "val", make_config(batch_size=2), False))[0][0]
    assert batch["fixed_image"].shape == (2, 1, 12, 14)
    assert batch["fixed_label"].shape == (2, 2, 12, 14)
    fixed, moving = batch["fixed_id"][0], batch["moving_id"][0]
    np.testing.assert_array_equal(batch["fixed_image"][0, 0],
                                  synthetic.image(fixed, shape=(12, 14)))
    np.testing.assert_array_equal(batch["moving_label"][0],
                                  synthetic.label_channels(moving, shape=(12, 14)))


def test_user_errors_name_the_file_split_or_key(make_dataset, tmp_path):
    config = make_config()
    with pytest.raises(DataError, match="no manifest"):
        build_dataloader(tmp_path / "nothing" / "manifest.json", "train", config, True)
    manifest = make_dataset("unpaired", "integer")
    with pytest.raises(DataError, match="manifest.json: no cases in split 'test'"):
        build_dataloader(manifest, "test", config, False)
    with pytest.raises(ConfigError, match="loader.patch.size"):
        build_dataloader(manifest, "train", make_config(patch={"size": [16, 8, 8]}), True)
    (manifest.parent / "labels" / "case000.nii.gz").unlink()
    loader = build_dataloader(manifest, "train", make_config(batch_size=6), True)
    with pytest.raises(DataError, match=r"labels/case000\.nii\.gz: no such file"):
        epochs(loader)


def test_fold_k_validates_on_fold_k_and_trains_on_the_other_folds(make_dataset):
    path = make_dataset("unpaired", None)
    manifest = Manifest.read(path)
    no_folds = make_config(fold=0)
    with pytest.raises(DataError, match="loader.fold 0 but the manifest has no folds"):
        build_dataloader(path, "train", no_folds, train=True)
    manifest = manifest.model_copy(update={"cases": [  # the 10 train and val cases in 3 folds
        case.model_copy(update={"fold": index % 3}) for index, case in enumerate(manifest.cases)]})
    manifest.write(path)
    in_fold = {case.case_id for case in manifest.cases if case.fold == 1}
    val = build_dataloader(path, "val", make_config(fold=1), train=False)
    train = build_dataloader(path, "train", make_config(fold=1, batch_size=2), train=True)
    assert set(val.dataset.cases) == in_fold
    assert set(train.dataset.cases) == {case.case_id for case in manifest.cases} - in_fold
    trained_on = {case for batches in epochs(train, 3) for pair in pairs_of(batches)
                  for case in pair}
    assert trained_on and not trained_on & in_fold
    with pytest.raises(DataError, match="loader.fold 3 but the manifest has 3 folds"):
        build_dataloader(path, "val", make_config(fold=3), train=False)


FLIP_ONLY = {"enabled": True, "flip": {"enabled": True, "axes": [0, 1, 2]},
             "affine": {"enabled": False}, "elastic": {"enabled": False},
             "intensity": {"enabled": False}}


def test_flip_mirrors_the_whole_pair_alike(synthetic, make_dataset):
    manifest = make_dataset("unpaired", "integer")
    loader = build_dataloader(manifest, "train", make_config(3, FLIP_ONLY, batch_size=1), True)
    flips_seen = set()
    for batch in [b for batches in epochs(loader, 4) for b in batches]:
        originals = {side: (synthetic.image(batch[f"{side}_id"][0]),
                            synthetic.label_channels(batch[f"{side}_id"][0]))
                     for side in ("fixed", "moving")}
        # the one set of axes that turns both stored sides into the batch's
        matches = [axes for axes in ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))
                   if all(np.array_equal(np.flip(image, axes), batch[f"{side}_image"][0, 0])
                          and np.array_equal(np.flip(label, [a + 1 for a in axes]),
                                             batch[f"{side}_label"][0])
                          for side, (image, label) in originals.items())]
        assert len(matches) == 1
        flips_seen.add(matches[0])
    assert len(flips_seen) >= 4  # each axis flipped at random, not always the same way
