"""Margin functions, margin heads and centre loss: formulas, boundaries, numerics, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from dml.losses import (
    ArcFace,
    CenterLoss,
    CombinedMargin,
    CosFace,
    MarginHead,
    NormalizedSoftmax,
    SphereFace,
    SubCenterArcFace,
    dynamic_margins,
)

ALL_MARGINS = {
    "arcface": lambda s: ArcFace(s=s, m=0.5),
    "arcface_easy": lambda s: ArcFace(s=s, m=0.5, boundary="easy"),
    "arcface_st": lambda s: ArcFace(s=s, m=0.5, boundary="straight_through"),
    "cosface": lambda s: CosFace(s=s, m=0.35),
    "sphereface": lambda s: SphereFace(s=s, m=4.0),
    "combined": lambda s: CombinedMargin(s=s, m1=1.35, m2=0.3, m3=0.2),
    "normalized_softmax": lambda s: NormalizedSoftmax(s=s),
}


def target_logit(margin, cosines, dtype=torch.float64):
    """The margin's (scaled) target logit for each value in ``cosines`` (one row each)."""
    cosine = torch.as_tensor(cosines, dtype=dtype).reshape(-1, 1)
    return margin(cosine, torch.zeros(cosine.shape[0], dtype=torch.long))[:, 0]


def test_arcface_formula_on_targets_and_plain_scale_elsewhere():
    torch.manual_seed(0)
    cosine = torch.rand(6, 5, dtype=torch.float64) * 1.6 - 0.7  # theta + 0.5 < pi everywhere
    labels = torch.tensor([0, 4, 2, -1, 1, 3])
    logits = ArcFace(s=30.0, m=0.5)(cosine, labels)
    expected = 30.0 * cosine.clone()
    for row, label in enumerate(labels.tolist()):
        if label >= 0:
            expected[row, label] = 30.0 * math.cos(math.acos(cosine[row, label]) + 0.5)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(logits[3], 30.0 * cosine[3])  # label -1: scale only


@pytest.mark.parametrize("name", ["cosface", "sphereface", "combined", "normalized_softmax"])
def test_rows_without_target_get_only_the_scale(name):
    cosine = torch.rand(4, 7, dtype=torch.float64) * 2 - 1
    logits = ALL_MARGINS[name](10.0)(cosine, torch.full((4,), -1))
    torch.testing.assert_close(logits, 10.0 * cosine)


def test_arcface_boundary_variants_past_pi_minus_m():
    m, s = 0.5, 2.0
    past = [math.cos(math.pi - m) - 0.01, -0.95, -1.0]
    fallback = target_logit(ArcFace(s=s, m=m), past)
    torch.testing.assert_close(fallback, s * (torch.tensor(past, dtype=torch.float64) - m * math.sin(m)))
    easy = target_logit(ArcFace(s=s, m=m, boundary="easy"), [-0.3, 0.3])
    torch.testing.assert_close(easy, torch.tensor([s * -0.3, s * math.cos(math.acos(0.3) + m)], dtype=torch.float64))
    straight = target_logit(ArcFace(s=s, m=m, boundary="straight_through"), [*past, 0.3])
    expected = [-s] * 3 + [s * math.cos(math.acos(0.3) + m)]
    torch.testing.assert_close(straight, torch.tensor(expected, dtype=torch.float64))


def test_arcface_straight_through_gradient_is_that_of_the_plain_cosine():
    cosine = torch.tensor([[0.999], [0.3], [-0.95], [-1.0]], dtype=torch.float64, requires_grad=True)
    ArcFace(s=3.0, m=0.5, boundary="straight_through")(cosine, torch.zeros(4, dtype=torch.long)).sum().backward()
    torch.testing.assert_close(cosine.grad, torch.full_like(cosine, 3.0))
    cosine.grad = None
    ArcFace(s=3.0, m=0.5)(cosine, torch.zeros(4, dtype=torch.long)).sum().backward()
    assert cosine.grad[0, 0] > 3.0 * 10  # the exact ArcFace gradient spikes near theta = 0


@pytest.mark.parametrize(
    "margin",
    [
        ArcFace(1.0, 0.5),
        ArcFace(1.0, 0.5, boundary="straight_through"),
        SphereFace(1.0, 4.0),
        SphereFace(1.0, 1.7),
        CombinedMargin(1.0, 1.35, 0.5, 0.2),
        CosFace(1.0, 0.35),
    ],
)
def test_target_logit_never_increases_with_the_angle(margin):
    angles = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    logits = target_logit(margin, torch.cos(angles))
    assert torch.all(logits[1:] <= logits[:-1] + 1e-12)
    assert logits[-1] < logits[0]


def test_sphereface_piecewise_extension():
    m = 4.0
    theta = torch.tensor([0.1, 0.5, math.pi / 4 - 1e-9, math.pi / 4 + 1e-9, 2.0, math.pi], dtype=torch.float64)
    logits = target_logit(SphereFace(s=1.0, m=m), torch.cos(theta))
    k = torch.floor(m * theta / math.pi)
    expected = (-1.0) ** k * torch.cos(m * theta) - 2 * k
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    assert logits[-1].item() == pytest.approx(1 - 2 * m, abs=1e-6)  # psi(pi) = 1 - 2m
    assert logits[2].item() == pytest.approx(logits[3].item(), abs=1e-6)  # continuous at pi/m
    blended = target_logit(SphereFace(s=1.0, m=m, blend=3.0), torch.cos(theta))
    torch.testing.assert_close(blended, (3.0 * torch.cos(theta) + expected) / 4.0, atol=1e-6, rtol=0)


def test_combined_margin_reduces_to_its_special_cases():
    cosine = torch.linspace(-0.8, 0.99, 50, dtype=torch.float64).reshape(10, 5)  # theta + 0.5 < pi
    labels = torch.tensor([0, 1, 2, 3, 4, -1, 0, 1, 2, 3])
    torch.testing.assert_close(CombinedMargin(8.0, 1.0, 0.5, 0.0)(cosine, labels), ArcFace(8.0, 0.5)(cosine, labels))
    torch.testing.assert_close(CombinedMargin(8.0, 1.0, 0.0, 0.35)(cosine, labels), CosFace(8.0, 0.35)(cosine, labels))
    torch.testing.assert_close(CombinedMargin(8.0, 1.5, 0.0, 0.0)(cosine, labels), SphereFace(8.0, 1.5)(cosine, labels))
    theta = torch.acos(cosine[8, 2])  # 1.2 theta + 0.3 < pi
    value = CombinedMargin(8.0, 1.2, 0.3, 0.1)(cosine, labels)[8, 2]
    assert value.item() == pytest.approx(8.0 * (math.cos(1.2 * theta + 0.3) - 0.1), abs=1e-9)


def test_normalized_softmax_is_only_a_temperature():
    cosine = torch.rand(3, 4) * 2 - 1
    torch.testing.assert_close(NormalizedSoftmax(s=20.0)(cosine, torch.tensor([0, 3, -1])), 20.0 * cosine)


@pytest.mark.parametrize("name", sorted(ALL_MARGINS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cosines_at_exactly_plus_minus_one_are_finite_in_value_and_gradient(name, dtype):
    cosine = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.5], [1.0, 1.0, -1.0], [0.2, -1.0, 1.0]], dtype=dtype)
    cosine.requires_grad_(True)
    logits = ALL_MARGINS[name](64.0)(cosine, torch.tensor([0, 0, 2, -1]))
    assert logits.dtype == dtype
    assert torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert torch.isfinite(cosine.grad.float()).all()


@pytest.mark.parametrize("name", sorted(ALL_MARGINS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_agrees_with_float32(name, dtype):
    torch.manual_seed(1)
    cosine = torch.rand(16, 10) * 1.9 - 0.95
    labels = torch.randint(0, 10, (16,))
    margin = ALL_MARGINS[name](64.0)
    low = margin(cosine.to(dtype), labels).float()
    # reference: the float32 margin of the same (rounded) half-precision cosines; the only
    # error allowed is the final rounding to the half type (at most one ulp)
    reference = margin(cosine.to(dtype).float(), labels)
    torch.testing.assert_close(low, reference, atol=1e-3, rtol=torch.finfo(dtype).eps)


@pytest.mark.parametrize("name", sorted(ALL_MARGINS))
def test_huge_scale_with_cross_entropy_stays_finite(name):
    torch.manual_seed(2)
    embeddings = torch.randn(8, 6, requires_grad=True)
    head = MarginHead(6, 5, ALL_MARGINS[name](1e4))
    with torch.no_grad():  # put some targets exactly on their centre and some opposite it
        head.weight[0] = embeddings[0].detach()
        head.weight[1] = -embeddings[1].detach()
    loss = head(embeddings, torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(head.weight.grad).all()


def test_gradcheck_away_from_the_boundaries():
    torch.manual_seed(3)
    cosine = (torch.rand(4, 5, dtype=torch.float64) * 1.2 - 0.6).requires_grad_(True)
    labels = torch.tensor([0, 3, -1, 4])
    for margin in (ArcFace(4.0, 0.4), SphereFace(4.0, 1.7), CombinedMargin(4.0, 1.2, 0.2, 0.1), CosFace(4.0)):
        assert torch.autograd.gradcheck(lambda c, margin=margin: margin(c, labels), (cosine,))


def test_per_class_margins_use_each_rows_own_class():
    margins = torch.tensor([0.1, 0.3, 0.5, 0.2])
    cosine = torch.rand(5, 4, dtype=torch.float64) * 1.2 - 0.5
    labels = torch.tensor([2, 0, 3, -1, 1])
    logits = ArcFace(s=10.0, m=margins)(cosine, labels)
    for row, label in enumerate(labels.tolist()):
        single = ArcFace(s=10.0, m=float(margins[label]) if label >= 0 else 0.0)(
            cosine[row : row + 1], labels[row : row + 1]
        )
        torch.testing.assert_close(logits[row], single[0])
    cosface = CosFace(s=10.0, m=margins)(cosine, labels)
    assert cosface[0, 2].item() == pytest.approx(10.0 * (cosine[0, 2].item() - 0.5))
    with pytest.raises(ValueError, match="full class axis"):
        ArcFace(m=margins)(cosine[:, :3], torch.zeros(5, dtype=torch.long))


def test_dynamic_margins_follow_the_power_law_between_the_bounds():
    counts = torch.tensor([1000, 10, 1, 100, 10, 0])
    margins = dynamic_margins(counts, m_min=0.1, m_max=0.6, power=0.5)
    assert margins[0].item() == pytest.approx(0.1) and margins[2].item() == pytest.approx(0.6)
    assert margins[5].item() == pytest.approx(0.6)  # a count of 0 counts as 1
    assert margins[1].item() == margins[4].item()
    # m = a * n^-0.5 + b with a, b fixed by the two ends
    a = 0.5 / (1 - 1000**-0.5)
    b = 0.1 - a * 1000**-0.5
    assert margins[3].item() == pytest.approx(a * 100**-0.5 + b, abs=1e-6)
    assert torch.equal(dynamic_margins([5, 5, 5], 0.1, 0.4, 0.25), torch.full((3,), 0.4))
    head = MarginHead(4, 6, ArcFace(s=8.0, m=margins), sub_centers=2)
    assert torch.isfinite(head(torch.randn(3, 4), torch.tensor([0, 2, 5])))


@pytest.mark.parametrize(
    "bad",
    [
        dict(class_counts=[]),
        dict(class_counts=[1, -2]),
        dict(class_counts=[1, 2], m_min=0.5, m_max=0.1),
        dict(class_counts=[1], power=0),
    ],
)
def test_dynamic_margins_reject_bad_input(bad):
    with pytest.raises(ValueError):
        dynamic_margins(**bad)


def test_bad_margin_arguments_and_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="scale"):
        ArcFace(s=0.0)
    with pytest.raises(ValueError, match="margin"):
        ArcFace(m=4.0)
    with pytest.raises(ValueError, match="boundary"):
        ArcFace(boundary="clip")
    with pytest.raises(ValueError, match=">= 1"):
        SphereFace(m=0.5)
    with pytest.raises(ValueError, match="m1"):
        CombinedMargin(64.0, 0.0, 0.1, 0.1)
    margin = ArcFace()
    with pytest.raises(ValueError, match="labels must be -1 or in"):
        margin(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer"):
        margin(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        margin(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        margin(torch.zeros(3), torch.tensor([0, 1, 2]))


def test_sub_center_cosine_is_the_max_over_each_class_sub_centres():
    torch.manual_seed(4)
    layer = SubCenterArcFace(embedding_dim=8, num_classes=5, k=3)
    embeddings = torch.randn(7, 8)
    cosine = layer(embeddings)
    all_cosines = F.normalize(embeddings, dim=1) @ F.normalize(layer.weight, dim=1).t()
    for c in range(5):
        torch.testing.assert_close(cosine[:, c], all_cosines[:, 3 * c : 3 * c + 3].max(dim=1).values)
    direction = torch.randn(8)
    samples = direction + 0.05 * torch.randn(4, 8)
    with torch.no_grad():  # class 1: make sub-centre 2 the nearest for every sample of the class
        layer.weight[3 * 1 + 2] = direction
    dominant = layer.dominant_subcenters(samples, torch.ones(4, dtype=torch.long))
    assert dominant[1].item() == 2


def test_margin_head_learns_a_separable_problem():
    torch.manual_seed(5)
    centres = F.normalize(torch.randn(4, 16), dim=1)
    labels = torch.arange(4).repeat(16)
    embeddings = centres[labels] + 0.1 * torch.randn(64, 16)
    head = MarginHead(16, 4, ArcFace(s=16.0, m=0.3), sub_centers=2)
    optimizer = torch.optim.SGD(head.parameters(), lr=2.0)
    first = head(embeddings, labels).item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = head(embeddings, labels)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first
    assert (head.centres(embeddings).argmax(1) == labels).float().mean() > 0.95
    with pytest.raises(ValueError, match="labels"):
        head(embeddings[:2], torch.tensor([0, 4]))


def test_center_loss_value_gradient_and_own_learning_rate():
    torch.manual_seed(6)
    loss_fn = CenterLoss(num_classes=3, embedding_dim=4)
    x = torch.randn(5, 4, requires_grad=True)
    labels = torch.tensor([0, 2, 2, 1, 0])
    loss = loss_fn(x, labels)
    expected = 0.5 * ((x - loss_fn.centres[labels]) ** 2).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    torch.testing.assert_close(x.grad, (x - loss_fn.centres[labels]).detach() / 5)
    centre_grad = torch.zeros(3, 4)
    centre_grad.index_add_(0, labels, (loss_fn.centres[labels] - x).detach() / 5)
    torch.testing.assert_close(loss_fn.centres.grad, centre_grad)
    before = loss_fn.centres.detach().clone()
    optimizer = torch.optim.SGD([{"params": [x]}, {"params": loss_fn.parameters(), "lr": 0.5}], lr=0.0)
    optimizer.step()
    torch.testing.assert_close(loss_fn.centres.detach(), before - 0.5 * centre_grad)
    with pytest.raises(ValueError, match="labels must be in"):
        loss_fn(x, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="shape"):
        loss_fn(torch.randn(5, 3), labels)
