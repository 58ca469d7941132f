import math

import torch
import torch.nn.functional as F

from pipeline.nn.models import SmallCNN
from pipeline.methods.pretrain import OBJECTIVES
from pipeline.methods.pretrain.losses import (
    barlow_twins_loss,
    batch_standardise,
    mixco_term,
    mixed_barlow_regulariser,
    nt_xent,
    supcon,
)


def nt_xent_loop(z1, z2, t):
    """Reference NT-Xent written term by term from Chen et al. 2020, eq. (1)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        num = math.exp(float(z[i] @ z[j]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(num / den)
    return total / n2


def test_nt_xent_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    assert abs(nt_xent(z1, z2, 0.5).item() - nt_xent_loop(z1, z2, 0.5)) < 1e-5


def test_nt_xent_is_low_for_matching_views():
    z = torch.randn(8, 16)
    assert nt_xent(z, z, 0.1) < nt_xent(z, torch.randn(8, 16), 0.1)


def test_each_objective_gives_a_finite_differentiable_loss():
    model = SmallCNN(1, 10, 4)
    x, y, g = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,)), torch.Generator().manual_seed(0)
    for name in OBJECTIVES.names():
        model.zero_grad()
        obj = OBJECTIVES[name](model, x, 0.5)
        loss = obj(model, x, y, g)
        loss.backward()
        assert torch.isfinite(loss)
        assert any(p.grad is not None for p in model.body.parameters())


def supcon_loop(z, labels, t):
    """SupCon's L_out (Khosla et al. 2020, eq. 2) term by term."""
    z = F.normalize(z, dim=1)
    total, anchors = 0.0, 0
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        den = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(len(z)) if a != i)
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / t) / den) for p in positives) / len(positives)
        anchors += 1
    return total / anchors


def test_supcon_matches_the_definition_and_reduces_to_nt_xent_with_unique_labels():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 4, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])
    assert abs(supcon(z, labels, 0.3).item() - supcon_loop(z, labels, 0.3)) < 1e-5
    # every image its own class, two views each: SupCon is exactly SimCLR's NT-Xent
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    ids = torch.arange(5)
    assert torch.allclose(supcon(torch.cat([z1, z2]), torch.cat([ids, ids]), 0.5), nt_xent(z1, z2, 0.5), atol=1e-6)


def test_barlow_twins_loss_matches_the_definition():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g)
    a, b = batch_standardise(z1), batch_standardise(z2)
    c = [[float((a[:, i] * b[:, j]).sum()) / 16 for j in range(3)] for i in range(3)]
    expected = sum((1 - c[i][i]) ** 2 for i in range(3)) + 0.1 * sum(
        c[i][j] ** 2 for i in range(3) for j in range(3) if i != j)
    assert abs(barlow_twins_loss(z1, z2, 0.1).item() - expected) < 1e-5
    # decorrelated, identical embeddings: C is the identity and the loss is zero
    q, _ = torch.linalg.qr(torch.randn(16, 3, generator=g))  # near-decorrelated columns
    q = batch_standardise(q)
    assert barlow_twins_loss(q, q, 1.0).item() < 0.2 < barlow_twins_loss(q, q.roll(1, 1), 1.0).item()


def test_selfcon_contrasts_the_sub_network_exit_with_the_last_layer():
    model = SmallCNN(1, 10, 4)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    obj = OBJECTIVES["selfcon"](model, x, 0.5)
    assert obj.exit_index == 1
    assert not set(map(id, obj.parameters())) & set(map(id, model.parameters())), "no shared parameters"
    assert obj.sub_projector[0].in_features == 8  # the middle block's channels (2 x width)
    obj(model, x, y, torch.Generator().manual_seed(0)).backward()
    assert model.body[0][0].weight.grad is not None and obj.sub_projector[0].weight.grad is not None
    assert model.body[3][0].weight.grad is not None, "the last block trains through the main exit"


def test_mixco_term_matches_the_authors_definition():
    """Worked from the authors' SimCLR code (sungnyun/MixCo-Mixup-Contrastive, simclr/pretrain.py,
    _mix_step): mixes of image i with image i + N/2, per-image lam, logits of each normalised
    mix against every normalised clean embedding over the temperature, soft targets lam at i
    and 1 - lam at i + N/2, soft cross-entropy averaged over the N/2 mixes."""
    g = torch.Generator().manual_seed(3)
    zm, zc = torch.randn(2, 3, generator=g), torch.randn(4, 3, generator=g)
    lam, t = torch.tensor([0.7, 0.2]), 0.5
    a, b = F.normalize(zm, dim=1), F.normalize(zc, dim=1)
    total = 0.0
    for i in range(2):
        den = sum(math.exp(float(a[i] @ b[k]) / t) for k in range(4))
        p = lambda k: math.exp(float(a[i] @ b[k]) / t) / den  # noqa: E731
        total += -(lam[i] * math.log(p(i)) + (1 - lam[i]) * math.log(p(i + 2)))
    assert abs(mixco_term(zm, zc, lam, t).item() - float(total) / 2) < 1e-5
    # lam = 1: InfoNCE of each mix against its first source among all N clean embeddings
    assert torch.allclose(mixco_term(zm, zc, torch.ones(2), t), F.cross_entropy(a @ b.T / t, torch.arange(2)))


def test_mixco_mixes_each_image_with_its_own_lambda_in_both_views():
    torch.manual_seed(0)
    model = SmallCNN(1, 10, 4)
    obj = OBJECTIVES["mixco"](model, torch.randn(2, 1, 8, 8), 0.5)
    seen = []
    handle = model.body.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    x = torch.randn(7, 1, 8, 8)
    loss = obj(model, x, torch.zeros(7, dtype=torch.long), torch.Generator().manual_seed(1))
    handle.remove()
    assert torch.isfinite(loss)
    assert seen == [14, 6], "two clean views of 7 images, then 3 mixes per view (odd image left out)"


def test_mixed_barlow_regulariser_matches_the_definition_and_favours_linear_mixes():
    g = torch.Generator().manual_seed(4)
    za, zb = torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g)
    perm = torch.randperm(16, generator=g)
    lam = torch.tensor(0.6)
    zm = torch.randn(16, 3, generator=g)
    a, b, m = batch_standardise(za), batch_standardise(zb), batch_standardise(zm)
    c = lambda u, v, i, j: float((u[:, i] * v[:, j]).sum()) / 16  # noqa: E731
    mix = lam * a + (1 - lam) * b[perm]
    expected = sum((c(m, t, i, j) - c(mix, t, i, j)) ** 2 for t in (a, b) for i in range(3) for j in range(3))
    assert abs(mixed_barlow_regulariser(za, zb, zm, lam, perm).item() - expected) < 1e-5
    # a mix that embeds linearly is far closer to its prediction than an unrelated embedding
    linear = mixed_barlow_regulariser(za, zb, lam * za + (1 - lam) * zb[perm], lam, perm)
    assert linear < 0.5 * mixed_barlow_regulariser(za, zb, zm, lam, perm)
