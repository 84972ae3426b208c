"""Pair losses and miners against brute-force definitions, plus memory at batch 1024."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dml.losses import (
    ContrastiveLoss,
    DistanceWeightedMiner,
    MultiSimilarityLoss,
    MultiSimilarityMiner,
    PairMasks,
    TripletMarginLoss,
    Triplets,
)


def batch(size=24, dim=6, classes=5, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(size, dim, dtype=dtype, generator=generator)
    return embeddings, torch.randint(0, classes, (size,), generator=generator)


def value_and_grad(loss_fn, embeddings):
    x = embeddings.clone().requires_grad_(True)
    value = loss_fn(x)
    value.backward()
    return value.detach(), x.grad


def brute_force_triplet(x, labels, margin, keep):
    """Mean of the non-zero relu(d_ap - d_an + margin) over triplets with keep(d_ap, d_an)."""
    unit = F.normalize(x, dim=1)
    losses = []
    for a, p, n in itertools.product(range(len(labels)), repeat=3):
        if a != p and labels[a] == labels[p] and labels[a] != labels[n]:
            d_ap, d_an = (unit[a] - unit[p]).norm(), (unit[a] - unit[n]).norm()
            if keep(d_ap.item(), d_an.item()):
                losses.append(F.relu(d_ap - d_an + margin))
    nonzero = [loss for loss in losses if loss.item() > 0]
    return torch.stack(nonzero).mean() if nonzero else x.sum() * 0


MINED = {
    "all": lambda ap, an, mm: an - ap <= mm,
    "hard": lambda ap, an, mm: an - ap <= min(0.0, mm),
    "semihard": lambda ap, an, mm: 0 < an - ap <= mm,
    "easy": lambda ap, an, mm: an - ap > mm,
}


@pytest.mark.parametrize("mining", sorted(MINED))
@pytest.mark.parametrize("mining_margin", [None, 0.1])
def test_triplet_mining_matches_brute_force_enumeration(mining, mining_margin):
    x, labels = batch(size=14, classes=3)
    margin = 0.3
    mm = margin if mining_margin is None else mining_margin
    ours = value_and_grad(lambda e: TripletMarginLoss(margin, mining, mining_margin)(e, labels), x)
    reference = value_and_grad(
        lambda e: brute_force_triplet(e, labels, margin, lambda ap, an: MINED[mining](ap, an, mm)), x
    )
    torch.testing.assert_close(ours[0], reference[0])
    torch.testing.assert_close(ours[1], reference[1])
    if mining == "easy" and mining_margin is None:
        assert ours[0].item() == 0.0  # easy triplets already satisfy the margin
    else:
        assert ours[0].item() > 0


def test_batch_hard_uses_the_farthest_positive_and_closest_negative():
    x, labels = batch(size=16, classes=4, seed=1)
    unit = F.normalize(x, dim=1)
    distance = torch.cdist(unit, unit)
    losses = []
    for a in range(16):
        positives = [p for p in range(16) if p != a and labels[p] == labels[a]]
        negatives = [n for n in range(16) if labels[n] != labels[a]]
        if positives and negatives:
            losses.append(max(distance[a, p] for p in positives) - min(distance[a, n] for n in negatives) + 0.2)
    losses = torch.stack(losses).clamp_min(0)
    expected = losses[losses > 0].mean()
    value = TripletMarginLoss(0.2, "batch_hard")(x, labels)
    assert value.item() == pytest.approx(expected.item(), rel=1e-9)


def test_explicit_triplets_override_mining():
    x, labels = batch(size=6, classes=2, seed=2)
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    triplets = Triplets(torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([2, 4]))
    unit = F.normalize(x, dim=1)

    def d(i, j):
        return (unit[i] - unit[j]).norm()

    terms = torch.stack([d(0, 1) - d(0, 2) + 1.5, d(2, 3) - d(2, 4) + 1.5]).clamp_min(0)
    value = TripletMarginLoss(1.5, mining="hard")(x, labels, triplets=triplets)
    assert value.item() == pytest.approx(terms[terms > 0].mean().item())


def test_contrastive_matches_its_definition():
    x, labels = batch(size=12, classes=3, seed=3)
    unit = F.normalize(x, dim=1)
    positive, negative = [], []
    for i, j in itertools.permutations(range(12), 2):
        d = (unit[i] - unit[j]).norm()
        if labels[i] == labels[j]:
            positive.append(F.relu(d - 0.4))
        else:
            negative.append(F.relu(1.2 - d))
    positive, negative = torch.stack(positive), torch.stack(negative)
    expected = positive[positive > 0].mean() + negative[negative > 0].mean()
    assert ContrastiveLoss(0.4, 1.2)(x, labels).item() == pytest.approx(expected.item())


def test_multi_similarity_matches_its_definition():
    x, labels = batch(size=10, classes=3, seed=4)
    unit = F.normalize(x, dim=1)
    similarity = unit @ unit.t()
    total = 0.0
    for i in range(10):
        pos = [similarity[i, j] for j in range(10) if j != i and labels[j] == labels[i]]
        neg = [similarity[i, k] for k in range(10) if labels[k] != labels[i]]
        total += math.log(1 + sum(math.exp(-2.0 * (s - 0.5)) for s in pos)) / 2.0
        total += math.log(1 + sum(math.exp(50.0 * (s - 0.5)) for s in neg)) / 50.0
    assert MultiSimilarityLoss(2.0, 50.0, 0.5)(x, labels).item() == pytest.approx(total / 10)


def test_multi_similarity_miner_keeps_exactly_the_informative_pairs():
    x, labels = batch(size=12, classes=3, seed=5)
    unit = F.normalize(x, dim=1)
    similarity = unit @ unit.t()
    masks = MultiSimilarityMiner(epsilon=0.1)(x, labels)
    for i in range(12):
        pos = [j for j in range(12) if j != i and labels[j] == labels[i]]
        neg = [k for k in range(12) if labels[k] != labels[i]]
        for j in range(12):
            keep_pos = j in pos and bool(neg) and similarity[i, j] - 0.1 < max(similarity[i, k] for k in neg)
            keep_neg = j in neg and bool(pos) and similarity[i, j] + 0.1 > min(similarity[i, p] for p in pos)
            assert masks.positive[i, j].item() == keep_pos and masks.negative[i, j].item() == keep_neg
    assert 0 < masks.negative.sum() < (labels[:, None] != labels[None]).sum()
    assert not masks.positive.requires_grad
    mined = MultiSimilarityLoss(miner=MultiSimilarityMiner(0.1))(x, labels)
    assert mined.item() == pytest.approx(MultiSimilarityLoss()(x, labels, pairs=masks).item())
    assert mined.item() != pytest.approx(MultiSimilarityLoss()(x, labels).item())


def test_distance_weighted_miner_samples_by_inverse_density():
    dim = 4
    embeddings = F.normalize(torch.randn(40, dim, generator=torch.Generator().manual_seed(6)), dim=1)
    labels = torch.arange(40) % 8
    miner = DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4, generator=torch.Generator().manual_seed(0))
    triplets = miner(embeddings, labels)
    distance = torch.cdist(embeddings, embeddings)
    assert (labels[triplets.anchor] == labels[triplets.positive]).all()
    assert (triplets.anchor != triplets.positive).all()
    assert (labels[triplets.anchor] != labels[triplets.negative]).all()
    assert (distance[triplets.anchor, triplets.negative] < 1.4).all()
    usable = ((labels[None] != labels[:, None]) & (distance < 1.4)).any(1)
    expected_pairs = sum(int((labels == labels[a]).sum()) - 1 for a in range(40) if usable[a])
    assert len(triplets.anchor) == expected_pairs  # one negative per positive pair
    # empirical frequencies of one anchor's negatives follow 1 / q(d), q the sphere density
    weights = miner.negative_weights(embeddings, labels)[0]
    d = distance[0].double().clamp(0.5, 1.4)
    inverse_density = d.pow(2 - dim) * (1 - d * d / 4).pow(-(dim - 3) / 2)
    inverse_density[(labels == labels[0]) | (distance[0] >= 1.4)] = 0
    torch.testing.assert_close(weights, inverse_density / inverse_density.sum())
    draws = torch.multinomial(weights, 20000, replacement=True, generator=torch.Generator().manual_seed(1))
    frequency = torch.bincount(draws, minlength=40).double() / 20000
    assert (frequency - weights).abs().max() < 0.02


def test_losses_normalise_embeddings_themselves():
    x, labels = batch(size=12, classes=3, seed=7)
    scale = torch.rand(12, 1, dtype=torch.float64) * 5 + 0.1
    for loss_fn in (TripletMarginLoss(0.2, "semihard"), ContrastiveLoss(0.1, 0.9), MultiSimilarityLoss()):
        assert loss_fn(x * scale, labels).item() == pytest.approx(loss_fn(x, labels).item())


def test_batches_without_pairs_give_zero_with_a_working_backward():
    x = torch.randn(5, 4, requires_grad=True)
    for labels in (torch.zeros(5, dtype=torch.long), torch.arange(5)):
        for loss_fn in (TripletMarginLoss(0.1), TripletMarginLoss(0.1, "batch_hard"), ContrastiveLoss(2.0, 0.0)):
            value = loss_fn(x, labels)
            value.backward()
            assert value.item() == 0.0 and torch.isfinite(x.grad).all()


def test_bad_arguments_raise_value_errors():
    x, labels = batch(size=4)
    with pytest.raises(ValueError, match="mining"):
        TripletMarginLoss(0.1, mining="hardest")
    with pytest.raises(ValueError, match="labels"):
        TripletMarginLoss()(x, labels.double())
    with pytest.raises(ValueError, match="labels"):
        ContrastiveLoss()(x, labels[:3])
    with pytest.raises(ValueError, match="pair masks"):
        MultiSimilarityLoss()(
            x, labels, pairs=PairMasks(torch.ones(3, 3, dtype=torch.bool), torch.ones(3, 3, dtype=torch.bool))
        )
    with pytest.raises(ValueError, match="cutoff"):
        DistanceWeightedMiner(cutoff=1.5, nonzero_loss_cutoff=1.4)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor produced by any aten op."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


@pytest.mark.parametrize(
    "loss_fn",
    [
        TripletMarginLoss(0.05, "all"),
        TripletMarginLoss(0.05, "semihard"),
        TripletMarginLoss(0.05, "batch_hard"),
        ContrastiveLoss(),
        MultiSimilarityLoss(miner=MultiSimilarityMiner()),
    ],
    ids=repr,
)
def test_batch_1024_never_builds_a_cubic_tensor(loss_fn):
    """Every tensor made in forward and backward holds at most ~B^2 elements (B^3 = 1.07e9)."""
    generator = torch.Generator().manual_seed(8)
    batch_size = 1024
    x = torch.randn(batch_size, 128, generator=generator, requires_grad=True)
    labels = torch.randint(0, 8, (batch_size,), generator=generator)  # ~128 positives per anchor
    with LargestTensor() as tracker:
        value = loss_fn(x, labels)
        value.backward()
    assert torch.isfinite(value) and value.item() > 0
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert tracker.largest <= batch_size * (batch_size + 1)
