"""Pair and label sampling: pure functions of ids and a numpy Generator."""

from collections import Counter

import numpy as np
import pytest

from regflow.data.pairs import (
    all_group_pairs,
    grouped_pairs,
    label_items,
    paired_pairs,
    unpaired_pairs,
)
from regflow.errors import DataError

IDS = [f"case{k}" for k in range(7)]
GROUPS = {"a": ["a2", "a0", "a1", "a3"], "b": ["b0", "b1", "b2"], "c": ["c0", "c1"]}


def group_of(case_id: str) -> str:
    return case_id[0]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_paired_pairs_keep_each_case_with_itself_in_order_or_shuffled():
    assert paired_pairs(["x", "y", "z"]) == [("x", "x"), ("y", "y"), ("z", "z")]
    shuffled = paired_pairs(IDS, rng(3))
    assert sorted(shuffled) == [(c, c) for c in IDS]
    assert shuffled != [(c, c) for c in IDS]


def test_unpaired_training_pairs_use_each_case_at_most_once():
    pairs = unpaired_pairs(IDS, rng(0))
    assert len(pairs) == 3  # floor(7 / 2)
    used = [case for pair in pairs for case in pair]
    assert len(set(used)) == 6 and set(used) <= set(IDS)
    assert all(fixed != moving for fixed, moving in pairs)


def test_unpaired_training_pairs_differ_between_generators():
    epochs = {tuple(unpaired_pairs(IDS, rng(epoch))) for epoch in range(10)}
    assert len(epochs) == 10
    assert unpaired_pairs(IDS, rng(4)) == unpaired_pairs(IDS, rng(4))


def test_unpaired_evaluation_pairs_are_distinct_ordered_pairs():
    pairs = unpaired_pairs(IDS, rng(1), count=20)
    assert len(pairs) == len(set(pairs)) == 20
    assert all(fixed != moving for fixed, moving in pairs)
    assert pairs == unpaired_pairs(IDS, rng(1), count=20)
    every = unpaired_pairs(IDS[:4], rng(1), count=100)  # only 4 * 3 exist
    assert sorted(every) == sorted((f, m) for f in IDS[:4] for m in IDS[:4] if f != m)


def test_unpaired_needs_two_cases():
    with pytest.raises(DataError, match="at least two cases"):
        unpaired_pairs(["only"], rng())


def test_grouped_intra_group_forward_moving_is_earlier():
    for seed in range(20):
        pairs = grouped_pairs(GROUPS, rng(seed), 1.0, "forward")
        assert sorted(group_of(moving) for _, moving in pairs) == ["a", "b", "c"]
        for fixed, moving in pairs:
            assert group_of(fixed) == group_of(moving)
            assert moving < fixed  # ids sort as their order in the group


def test_grouped_backward_moving_is_later():
    for seed in range(20):
        for fixed, moving in grouped_pairs(GROUPS, rng(seed), 1.0, "backward"):
            assert group_of(fixed) == group_of(moving) and moving > fixed


def test_grouped_unconstrained_gives_both_orders():
    pairs = [pair for seed in range(30) for pair in grouped_pairs(GROUPS, rng(seed), 1.0,
                                                                  "unconstrained")]
    assert all(group_of(f) == group_of(m) and f != m for f, m in pairs)
    assert any(m < f for f, m in pairs) and any(m > f for f, m in pairs)


def test_grouped_inter_group_pairs_cross_groups():
    for seed in range(20):
        pairs = grouped_pairs(GROUPS, rng(seed), 0.0, "forward")
        assert sorted(group_of(moving) for _, moving in pairs) == ["a", "b", "c"]
        assert all(group_of(fixed) != group_of(moving) for fixed, moving in pairs)


def test_grouped_mixing_probability_is_respected():
    pairs = [pair for seed in range(300) for pair in grouped_pairs(GROUPS, rng(seed), 0.3,
                                                                   "forward")]
    intra = np.mean([group_of(f) == group_of(m) for f, m in pairs])
    assert 0.24 < intra < 0.36


def test_grouped_single_image_group_pairs_across_and_single_group_within():
    groups = {"a": ["a0", "a1"], "s": ["s0"]}
    for seed in range(10):
        pairs = dict((group_of(m), f) for f, m in grouped_pairs(groups, rng(seed), 1.0, "forward"))
        assert group_of(pairs["s"]) == "a"
    assert grouped_pairs({"a": ["a0", "a1"]}, rng(), 0.0, "forward") == [("a1", "a0")]
    with pytest.raises(DataError, match="grouped data"):
        grouped_pairs({"a": ["a0"]}, rng(), 1.0, "forward")


def test_grouped_evaluation_pairs_are_distinct_and_capped_by_what_exists():
    pairs = grouped_pairs(GROUPS, rng(5), 1.0, "forward", count=8)
    assert len(set(pairs)) == 8 and pairs == grouped_pairs(GROUPS, rng(5), 1.0, "forward", count=8)
    every = grouped_pairs(GROUPS, rng(5), 1.0, "forward", count=50)
    assert len(every) == 6 + 3 + 1  # 4-choose-2 + 3-choose-2 + 2-choose-2 forward pairs


def test_label_items_stack_sample_all():
    pairs = [("f0", "m0"), ("f1", "m1"), ("f2", "m2")]
    assert label_items(pairs, 3, "stack", rng()) == [(f, m, -1) for f, m in pairs]
    assert label_items(pairs, 0, "sample", rng()) == [(f, m, -1) for f, m in pairs]
    sampled = [item for seed in range(20) for item in label_items(pairs, 3, "sample", rng(seed))]
    assert Counter(index for *_, index in sampled).keys() == {0, 1, 2}
    assert [item[:2] for item in label_items(pairs, 3, "sample", rng())] == pairs
    assert label_items(pairs[:2], 2, "all", rng()) == [
        ("f0", "m0", 0), ("f0", "m0", 1), ("f1", "m1", 0), ("f1", "m1", 1)]


def test_label_items_with_a_count_per_pair():
    pairs = [("a", "b"), ("c", "d")]
    assert label_items(pairs, [3, 1], "all", rng()) == [
        ("a", "b", 0), ("a", "b", 1), ("a", "b", 2), ("c", "d", 0)]
    sampled = [label_items(pairs, [3, 1], "sample", rng(seed))[1] for seed in range(10)]
    assert all(item == ("c", "d", 0) for item in sampled)


@pytest.mark.parametrize(("option", "expected"), [
    ("forward", [("b", "a"), ("c", "a"), ("c", "b"), ("y", "x")]),
    ("backward", [("a", "b"), ("a", "c"), ("b", "c"), ("x", "y")]),
    ("unconstrained", [("b", "a"), ("c", "a"), ("a", "b"), ("c", "b"), ("a", "c"), ("b", "c"),
                       ("y", "x"), ("x", "y")]),
])
def test_all_group_pairs_lists_every_intra_group_pair(option, expected):
    groups = {"g1": ["x", "y"], "g0": ["c", "a", "b"], "g2": ["z"]}
    assert all_group_pairs(groups, option) == expected
    with pytest.raises(DataError, match="need a group with two images"):
        all_group_pairs({"g0": ["a"], "g1": ["b"]}, option)
