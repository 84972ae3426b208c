"""Values and gradients against pytorch-metric-learning 2.9 (a test-only dependency) where
the definitions coincide, and the documented differences where they do not."""

import math

import pytest
import torch

from dml.losses import (
    ArcFace,
    ContrastiveLoss,
    CosFace,
    MarginHead,
    MultiSimilarityLoss,
    MultiSimilarityMiner,
    NormalizedSoftmax,
    SphereFace,
    TripletMarginLoss,
)

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def random_batch(size=48, dim=12, classes=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(size, dim, dtype=torch.float64, generator=generator),
        torch.randint(0, classes, (size,), generator=generator),
    )


def value_and_grad(loss_fn, embeddings):
    x = embeddings.clone().requires_grad_(True)
    value = loss_fn(x)
    value.backward()
    return value.detach(), x.grad


def assert_same(ours, reference):
    torch.testing.assert_close(ours[0], reference[0], **TOLERANCE)
    torch.testing.assert_close(ours[1], reference[1], **TOLERANCE)


def head_like(pml_loss, margin, sub_centers=1):
    """A MarginHead with the same class centres as a PML classification loss (W is (D, C))."""
    dim, columns = pml_loss.W.shape
    head = MarginHead(dim, columns // sub_centers, margin, sub_centers=sub_centers).double()
    with torch.no_grad():
        head.weight.copy_(pml_loss.W.t())
    return head


def compare_heads(head, pml_loss, embeddings, labels):
    ours = value_and_grad(lambda e: head(e, labels), embeddings)
    reference = value_and_grad(lambda e: pml_loss(e, labels), embeddings)
    assert_same(ours, reference)
    torch.testing.assert_close(head.weight.grad, pml_loss.W.grad.t(), **TOLERANCE)
    return ours


def opposite_targets(embeddings, labels, pml_loss, rows=4):
    """Point the first rows' embeddings away from their class centre (theta close to pi),
    which exercises ArcFace's fallback for theta + m > pi."""
    embeddings = embeddings.clone()
    embeddings[:rows] = -pml_loss.W.detach().t()[labels[:rows]] + 0.05 * embeddings[:rows]
    return embeddings


@pytest.mark.parametrize("margin_degrees", [28.6, 10.0, 45.0])
def test_arcface_matches_pml_with_the_margin_converted_from_degrees(margin_degrees):
    torch.manual_seed(0)
    embeddings, labels = random_batch()
    pml = pml_losses.ArcFaceLoss(num_classes=6, embedding_size=12, margin=margin_degrees, scale=64).double()
    embeddings = opposite_targets(embeddings, labels, pml)
    head = head_like(pml, ArcFace(s=64.0, m=math.radians(margin_degrees)))
    compare_heads(head, pml, embeddings, labels)


def test_arcface_defaults_differ_from_pml_defaults():
    """Ours: m = 0.5 rad (28.648 deg); PML: margin=28.6 deg. Both use s = 64."""
    torch.manual_seed(1)
    embeddings, labels = random_batch(seed=1)
    pml = pml_losses.ArcFaceLoss(num_classes=6, embedding_size=12).double()
    ours = head_like(pml, ArcFace())(embeddings, labels)
    reference = pml(embeddings, labels)
    assert abs(ours.item() - reference.item()) > 1e-3
    same = head_like(pml, ArcFace(m=math.radians(28.6)))(embeddings, labels)
    assert same.item() == pytest.approx(reference.item(), abs=1e-8)


@pytest.mark.parametrize("margin,scale", [(0.35, 64.0), (0.2, 30.0)])
def test_cosface_matches_pml(margin, scale):
    torch.manual_seed(2)
    embeddings, labels = random_batch(seed=2)
    pml = pml_losses.CosFaceLoss(num_classes=6, embedding_size=12, margin=margin, scale=scale).double()
    compare_heads(head_like(pml, CosFace(s=scale, m=margin)), pml, embeddings, labels)


def test_sub_center_arcface_matches_pml():
    torch.manual_seed(3)
    embeddings, labels = random_batch(seed=3)
    pml = pml_losses.SubCenterArcFaceLoss(num_classes=6, embedding_size=12, sub_centers=3).double()
    compare_heads(head_like(pml, ArcFace(m=math.radians(28.6)), sub_centers=3), pml, embeddings, labels)


def test_normalized_softmax_matches_pml_with_s_equal_to_one_over_temperature():
    torch.manual_seed(4)
    embeddings, labels = random_batch(seed=4)
    pml = pml_losses.NormalizedSoftmaxLoss(num_classes=6, embedding_size=12, temperature=0.05).double()
    compare_heads(head_like(pml, NormalizedSoftmax(s=20.0)), pml, embeddings, labels)


def test_sphereface_differs_from_pml_only_by_the_feature_norm():
    """PML scales logits by ||x|| (as the paper); ours uses a fixed s. On unit-norm
    embeddings the values agree and the gradients agree up to their radial part."""
    torch.manual_seed(5)
    embeddings, labels = random_batch(seed=5)
    pml = pml_losses.SphereFaceLoss(num_classes=6, embedding_size=12, margin=4, scale=3.0).double()
    head = head_like(pml, SphereFace(s=3.0, m=4.0))
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    ours = value_and_grad(lambda e: head(e, labels), unit)
    reference = value_and_grad(lambda e: pml(e, labels), unit)
    torch.testing.assert_close(ours[0], reference[0], **TOLERANCE)

    def tangential(g):
        return g - (g * unit).sum(1, keepdim=True) * unit

    torch.testing.assert_close(tangential(ours[1]), tangential(reference[1]), **TOLERANCE)
    assert (ours[1] * unit).sum(1).abs().max() < 1e-8  # ours is scale-invariant, PML is not
    assert (reference[1] * unit).sum(1).abs().max() > 1e-4
    scaled = 3.0 * embeddings
    assert head(scaled, labels).item() == pytest.approx(head(embeddings, labels).item())
    assert pml(scaled, labels).item() != pytest.approx(pml(embeddings, labels).item())


@pytest.mark.parametrize("mining", ["all", "hard", "semihard", "easy"])
def test_triplet_mining_matches_pml_triplet_margin_miner(mining):
    embeddings, labels = random_batch(seed=6)
    mining_margin = 0.1 if mining == "easy" else 0.2  # "easy" at the loss margin would give 0
    ours = value_and_grad(lambda e: TripletMarginLoss(0.2, mining, mining_margin)(e, labels), embeddings)
    miner = pml_miners.TripletMarginMiner(margin=mining_margin, type_of_triplets=mining)
    pml = pml_losses.TripletMarginLoss(margin=0.2)
    reference = value_and_grad(lambda e: pml(e, labels, miner(e, labels)), embeddings)
    assert ours[0].item() > 0
    assert_same(ours, reference)


def test_triplet_all_equals_pml_without_a_miner_and_batch_hard_equals_batch_hard_miner():
    embeddings, labels = random_batch(seed=7)
    pml = pml_losses.TripletMarginLoss(margin=0.1)
    assert_same(
        value_and_grad(lambda e: TripletMarginLoss(0.1, "all")(e, labels), embeddings),
        value_and_grad(lambda e: pml(e, labels), embeddings),
    )
    miner = pml_miners.BatchHardMiner()
    assert_same(
        value_and_grad(lambda e: TripletMarginLoss(0.1, "batch_hard")(e, labels), embeddings),
        value_and_grad(lambda e: pml(e, labels, miner(e, labels)), embeddings),
    )


def test_easy_mining_at_the_loss_margin_is_zero_here_and_in_pml():
    embeddings, labels = random_batch(seed=8)
    miner = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="easy")
    reference = pml_losses.TripletMarginLoss(margin=0.2)(embeddings, labels, miner(embeddings, labels))
    assert len(miner(embeddings, labels)[0]) > 0
    assert TripletMarginLoss(0.2, "easy")(embeddings, labels).item() == 0.0 == reference.item()


@pytest.mark.parametrize("pos_margin,neg_margin", [(0.0, 1.0), (0.3, 1.2)])
def test_contrastive_matches_pml(pos_margin, neg_margin):
    embeddings, labels = random_batch(seed=9)
    assert_same(
        value_and_grad(lambda e: ContrastiveLoss(pos_margin, neg_margin)(e, labels), embeddings),
        value_and_grad(lambda e: pml_losses.ContrastiveLoss(pos_margin, neg_margin)(e, labels), embeddings),
    )


@pytest.mark.parametrize("alpha,beta,base", [(2.0, 50.0, 0.5), (1.0, 10.0, 0.2)])
@pytest.mark.parametrize("mined", [False, True])
def test_multi_similarity_matches_pml(alpha, beta, base, mined):
    embeddings, labels = random_batch(seed=10)
    ours_loss = MultiSimilarityLoss(alpha, beta, base, miner=MultiSimilarityMiner(0.1) if mined else None)
    pml = pml_losses.MultiSimilarityLoss(alpha, beta, base)
    pml_miner = pml_miners.MultiSimilarityMiner(0.1)

    def reference(e):
        return pml(e, labels, pml_miner(e, labels)) if mined else pml(e, labels)

    assert_same(value_and_grad(lambda e: ours_loss(e, labels), embeddings), value_and_grad(reference, embeddings))
