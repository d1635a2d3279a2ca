"""train/losses.py against values computed by hand on tiny tensors."""
import math

import pytest

torch = pytest.importorskip("torch", reason="torch is a training requirement (.venv-train)")

from train import losses as L  # noqa: E402

# 1-D embeddings: identity 0 at 0.0 and 0.5, identity 1 at 0.6 and 2.0. Squared distances:
# d01=.25 d02=.36 d03=4 d12=.01 d13=2.25 d23=1.96. With margin 0.2 the eight valid triplets are
# (a,p,n): (0,1,2) semi-hard, loss .09; (0,1,3) easy 0; (1,0,2) hard .44; (1,0,3) easy 0;
# (2,3,0) hard 1.8; (2,3,1) hard 2.15; (3,2,0) easy 0; (3,2,1) easy (gap .29 > margin) 0.
E = torch.tensor([[0.0], [0.5], [0.6], [2.0]], dtype=torch.float64)
Y = torch.tensor([0, 0, 1, 1])


def triplets(mining):
    a, p, n = L.select_triplets(L.squared_distances(E), Y, mining, 0.2)
    return sorted(zip(a.tolist(), p.tolist(), n.tolist()))


def test_squared_distances_by_hand():
    d = L.squared_distances(E)
    assert d[0, 2].item() == pytest.approx(0.36)
    assert d[1, 2].item() == pytest.approx(0.01)
    assert d[3, 0].item() == pytest.approx(4.0)


def test_squared_distances_gradient_on_duplicates():
    x = torch.tensor([[0.6, 0.8], [0.6, 0.8], [1.0, 0.0]], requires_grad=True)
    L.squared_distances(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_selection_by_hand():
    assert len(triplets("all")) == 8
    assert triplets("hard") == [(1, 0, 2), (2, 3, 0), (2, 3, 1)]
    assert triplets("semihard") == [(0, 1, 2)]
    assert triplets("batch_hard") == [(0, 1, 2), (1, 0, 2), (2, 3, 1), (3, 2, 1)]
    with pytest.raises(ValueError):
        triplets("random")


def test_batch_hard_agrees_with_pytorch_metric_learning():
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.miners import BatchHardMiner

    g = torch.Generator().manual_seed(0)
    e = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    ours = L.select_triplets(L.squared_distances(e), y, "batch_hard", 0.2)
    theirs = BatchHardMiner(distance=LpDistance(normalize_embeddings=False, power=2))(e, y)
    for a, b in zip(ours, theirs):
        assert a.tolist() == b.tolist()


@pytest.mark.parametrize("mining, expected, count", [
    ("all", (0.09 + 0.44 + 1.8 + 2.15) / 8, 8),
    ("hard", (0.44 + 1.8 + 2.15) / 3, 3),
    ("semihard", 0.09, 1),
    ("batch_hard", (0.09 + 0.44 + 2.15 + 0.0) / 4, 4),
])
def test_triplet_loss_by_hand(mining, expected, count):
    loss, n = L.triplet_loss(E, Y, margin=0.2, mining=mining)
    assert n == count
    assert loss.item() == pytest.approx(expected)


def test_triplet_loss_without_triplets_is_a_graph_zero():
    e = E.clone().requires_grad_(True)
    loss, n = L.triplet_loss(e, torch.tensor([0, 1, 2, 3]), mining="all")  # no positives
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.all(e.grad == 0)


def head(features):
    h = L.BinaryHead(2, features)
    with torch.no_grad():
        h.linear.weight.copy_(torch.tensor([[1.0, -2.0]]))
        h.linear.bias.fill_(0.5)
    return h


def test_binary_head_features_by_hand():
    fi, fj = torch.tensor([[0.5, 0.2]]), torch.tensor([[0.1, -0.2]])
    # abs: |.4|, |.4| -> .4 - .8 + .5
    assert head("abs")(fi, fj).item() == pytest.approx(0.1)
    # chi2: .16 / (.5 + .1), .16 / (.2 + .2) -> .26667 - .8 + .5
    assert head("chi2")(fi, fj).item() == pytest.approx(0.16 / 0.6 - 0.8 + 0.5, abs=1e-5)
    # non-negative inputs: exactly the (fi - fj)^2 / (fi + fj) of the spec
    pos = head("chi2").pair_features(torch.tensor([0.5, 0.2]), torch.tensor([0.1, 0.3]))
    assert pos.tolist() == pytest.approx([0.16 / 0.6, 0.01 / 0.5], abs=1e-5)
    # guarded: 0/0 is 0, opposite signs stay bounded by |fi - fj|
    g = head("chi2").pair_features(torch.tensor([0.0, 0.1]), torch.tensor([0.0, -0.1]))
    assert g.tolist() == pytest.approx([0.0, 0.2], abs=1e-5)
    with pytest.raises(ValueError):
        L.BinaryHead(2, "cosine")


def test_binary_loss_by_hand():
    h = L.BinaryHead(2, "abs")
    with torch.no_grad():
        h.linear.weight.copy_(torch.tensor([[1.0, 0.0]]))
        h.linear.bias.zero_()
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    # pairs (0,1) same, logit 1; (0,2) different, logit 2; (1,2) different, logit 1
    sp = lambda z: math.log1p(math.exp(z))  # noqa: E731  softplus
    expected = (sp(-1.0) + (sp(2.0) + sp(1.0)) / 2) / 2
    assert L.binary_loss(h, e, torch.tensor([0, 0, 1])).item() == pytest.approx(expected, rel=1e-6)
    # only different pairs: their mean alone
    assert L.binary_loss(h, e, torch.tensor([0, 1, 2])).item() == pytest.approx((sp(1) + sp(2) + sp(1)) / 3, rel=1e-6)


def test_distillation_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    assert L.distill_cosine(s, t).item() == pytest.approx((0.4 + 0.0) / 2)
    assert L.distill_l2(s, t).item() == pytest.approx((0.16 + 0.64) / 2)
    # one pair: student similarity 0, teacher 0.8
    assert L.distill_pairwise(s, t).item() == pytest.approx(0.64)
    # the structure loss ignores the teacher's width
    t3 = torch.tensor([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0]])
    assert L.distill_pairwise(s, t3).item() == pytest.approx(0.64)
