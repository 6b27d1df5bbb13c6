"""Which images are registered to which: pair sampling for DeepReg's three dataset kinds.

Pure functions of case ids and a ``numpy.random.Generator``; nothing here reads files. A pair is
``(fixed_id, moving_id)``; a label item adds the label channel to use, ``(fixed_id, moving_id,
label_index)`` with ``label_index = -1`` meaning "all channels stacked".

- paired: each case holds its own fixed and moving image, so a pair is ``(case, case)``.
- unpaired: any two different cases. Training draws a fresh random pairing each epoch, every case in
  at most one pair (``floor(n / 2)`` pairs, as DeepReg); evaluation draws a fixed list of distinct
  ordered pairs.
- grouped: cases belong to groups (e.g. time points of one subject). Images in a group are ordered
  by case id; ``forward`` registers an earlier image (moving) to a later one (fixed), ``backward``
  a later one to an earlier one, ``unconstrained`` either way (DeepReg's meaning of the options).
  :func:`all_group_pairs` lists every intra-group pair instead of sampling.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from regflow.errors import DataError

Pair = tuple[str, str]
LabelItem = tuple[str, str, int]
IntraGroupOption = Literal["forward", "backward", "unconstrained"]
SampleLabel = Literal["stack", "sample", "all"]

STACK = -1
"""``label_index`` of an item that carries every label channel."""


def paired_pairs(case_ids: Sequence[str], rng: np.random.Generator | None = None) -> list[Pair]:
    """Pair each paired case's fixed image with its own moving image.

    Args:
        case_ids: the paired cases.
        rng: when given, the pairs come in a random order (training); else in ``case_ids`` order.

    Returns:
        ``[(case_id, case_id), ...]``, one pair per case.
    """
    order = rng.permutation(len(case_ids)) if rng is not None else range(len(case_ids))
    return [(case_ids[i], case_ids[i]) for i in order]


def unpaired_pairs(case_ids: Sequence[str], rng: np.random.Generator,
                   count: int | None = None) -> list[Pair]:
    """Pair different cases of an unpaired dataset.

    Args:
        case_ids: the cases (at least two).
        rng: source of randomness; the result is a function of its state.
        count: ``None`` for one training epoch: shuffle the cases and pair neighbours, so that each
            case is in at most one of the ``floor(n / 2)`` pairs. An integer for evaluation: that
            many distinct ordered pairs drawn without replacement (all ``n * (n - 1)`` pairs when
            fewer exist).

    Returns:
        ``[(fixed_id, moving_id), ...]`` with ``fixed_id != moving_id``.

    Raises:
        DataError: fewer than two cases.
    """
    n = len(case_ids)
    if n < 2:
        raise DataError(f"unpaired data: need at least two cases to pair, got {n}")
    if count is None:
        order = rng.permutation(n)
        return [(case_ids[order[k]], case_ids[order[k + 1]]) for k in range(0, n - 1, 2)]
    # Ordered pair number k <-> (i, j), i != j: i = k // (n - 1), j skips i.
    codes = rng.choice(n * (n - 1), size=min(count, n * (n - 1)), replace=False)
    fixed, rest = np.divmod(codes, n - 1)
    moving = rest + (rest >= fixed)
    return [(case_ids[i], case_ids[j]) for i, j in zip(fixed, moving, strict=True)]


def _intra_group_pair(members: Sequence[str], rng: np.random.Generator,
                      option: IntraGroupOption) -> Pair:
    first, second = rng.choice(len(members), size=2, replace=False)
    if option == "unconstrained":
        moving, fixed = first, second
    else:
        earlier, later = sorted((first, second))
        moving, fixed = (earlier, later) if option == "forward" else (later, earlier)
    return members[fixed], members[moving]


def _inter_group_pair(groups: Mapping[str, Sequence[str]], names: Sequence[str], group: str,
                      rng: np.random.Generator) -> Pair:
    others = [name for name in names if name != group]
    other = groups[others[rng.integers(len(others))]]
    moving = groups[group][rng.integers(len(groups[group]))]
    return other[rng.integers(len(other))], moving


def _group_pair(groups: Mapping[str, Sequence[str]], names: Sequence[str], group: str,
                rng: np.random.Generator, intra_group_prob: float,
                option: IntraGroupOption) -> Pair:
    """One pair whose moving image comes from ``group`` (intra-group with the given probability)."""
    intra_possible = len(groups[group]) >= 2
    inter_possible = len(names) >= 2
    intra = intra_possible and (not inter_possible or rng.random() < intra_group_prob)
    if intra:
        return _intra_group_pair(groups[group], rng, option)
    return _inter_group_pair(groups, names, group, rng)


def grouped_pairs(groups: Mapping[str, Sequence[str]], rng: np.random.Generator,
                  intra_group_prob: float, intra_group_option: IntraGroupOption,
                  count: int | None = None) -> list[Pair]:
    """Pair images of a grouped dataset.

    For each sampled group, with probability ``intra_group_prob`` both images come from that group
    (ordered by ``intra_group_option``); otherwise the moving image comes from that group and the
    fixed image from a different, random group. A group with a single image always gives an
    inter-group pair, and a dataset with a single group always an intra-group pair.

    Args:
        groups: group name -> case ids; images in a group are ordered by sorted case id.
        rng: source of randomness.
        intra_group_prob: probability in [0, 1] of an intra-group pair.
        intra_group_option: ``forward`` (moving earlier than fixed), ``backward`` (moving later)
            or ``unconstrained``.
        count: ``None`` for one training epoch: each group once, in random order, as the moving
            image's group. An integer for evaluation: up to that many distinct pairs, each from a
            random group (fewer when the dataset has fewer distinct pairs to give).

    Returns:
        ``[(fixed_id, moving_id), ...]`` with ``fixed_id != moving_id``.

    Raises:
        DataError: no group has two images and there are fewer than two groups.
    """
    members = {name: sorted(ids) for name, ids in groups.items() if ids}
    names = sorted(members)
    if len(names) < 2 and not any(len(ids) >= 2 for ids in members.values()):
        raise DataError("grouped data: need a group with two images or two non-empty groups")
    if count is None:
        return [_group_pair(members, names, names[g], rng, intra_group_prob, intra_group_option)
                for g in rng.permutation(len(names))]
    pairs: list[Pair] = []
    seen: set[Pair] = set()
    for _ in range(100 * count):
        group = names[rng.integers(len(names))]
        pair = _group_pair(members, names, group, rng, intra_group_prob, intra_group_option)
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
            if len(pairs) == count:
                break
    return pairs


def all_group_pairs(groups: Mapping[str, Sequence[str]], option: IntraGroupOption
                    ) -> list[Pair]:
    """Every intra-group pair, group by group in name order (DeepReg's
    ``sample_image_in_group: false``).

    Args:
        groups: group name -> case ids; images in a group are ordered by sorted case id.
        option: ``forward`` (moving earlier than fixed), ``backward`` (moving later) or
            ``unconstrained`` (both).

    Returns:
        ``[(fixed_id, moving_id), ...]``, by group, then moving image, then fixed image.

    Raises:
        DataError: no group has two images.
    """
    pairs: list[Pair] = []
    for name in sorted(groups):
        members = sorted(groups[name])
        for moving, fixed in itertools.permutations(range(len(members)), 2):
            if option == "unconstrained" or (moving < fixed) == (option == "forward"):
                pairs.append((members[fixed], members[moving]))
    if not pairs:
        raise DataError("grouped data: need a group with two images to pair within groups")
    return pairs


def label_items(pairs: Sequence[Pair], num_labels: int | Sequence[int],
                sample_label: SampleLabel, rng: np.random.Generator) -> list[LabelItem]:
    """Attach the label channel(s) each pair is registered with.

    Args:
        pairs: ``(fixed_id, moving_id)`` pairs.
        num_labels: label channels per image (0: the dataset has no labels), or one count per
            pair when images carry different numbers of labels (DeepReg allows it; a pair uses
            the channels both of its images have).
        sample_label: ``stack`` keeps all channels together (``label_index = -1``); ``sample``
            picks one random channel per pair, the same for fixed and moving; ``all`` repeats each
            pair once per channel (for evaluation).
        rng: source of randomness for ``sample``.

    Returns:
        ``[(fixed_id, moving_id, label_index), ...]``; every item is ``-1`` without labels.
    """
    counts = [num_labels] * len(pairs) if isinstance(num_labels, int) else list(num_labels)
    if not any(counts) or sample_label == "stack":
        return [(fixed, moving, STACK) for fixed, moving in pairs]
    if sample_label == "sample":
        return [(fixed, moving, int(rng.integers(count)))
                for (fixed, moving), count in zip(pairs, counts, strict=True)]
    return [(fixed, moving, channel) for (fixed, moving), count in zip(pairs, counts, strict=True)
            for channel in range(count)]
