import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.mix.losses import MIX_LOSSES, decoupled, rankmixup, smooth, soft_ce
from pipeline.methods.mix.recipe import MixRecipe
from pipeline.methods.mix.mixers import MIXERS, build_mixer, fourier_mask, spectral_residual_saliency
from pipeline.nn.models import SmallCNN

INPUT_MIXERS = [n for n in MIXERS.names() if n != "manifold_mixup"]


def rng(seed=0):
    return np.random.default_rng(seed)


def constant_images(n=4, size=8):
    """Image i is the constant i + 1: which pixels came from whom is readable from values."""
    return torch.arange(1, n + 1).float().view(n, 1, 1, 1).expand(n, 1, size, size).clone(), torch.arange(n)


@pytest.mark.parametrize("name", MIXERS.names())
def test_mixers_return_soft_labels(name):
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    mixer = build_mixer(name)
    if hasattr(mixer, "attach"):
        mixer.attach(SmallCNN(1, 10, 4))
    xm, ym = mixer(x, y, 10, 1.0, rng(0))
    assert xm.shape == x.shape and ym.shape == (16, 10)
    assert torch.allclose(ym.sum(1), torch.ones(16))
    assert (ym >= 0).all()


@pytest.mark.parametrize("name", INPUT_MIXERS)
def test_mixers_draw_from_their_generator_only(name):
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    a = MIXERS[name](x, y, 10, 1.0, rng(3))
    torch.manual_seed(7)  # the global RNG plays no part
    b = MIXERS[name](x, y, 10, 1.0, rng(3))
    c = MIXERS[name](x, y, 10, 1.0, rng(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if name != "none":
        assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])), "another seed, another draw"


@pytest.mark.parametrize("name", ["cutmix", "resizemix", "saliencymix", "fmix", "gridmix"])
def test_cut_and_paste_mixers_weight_labels_by_the_area_kept(name):
    """Each pixel comes from the image itself or its partner (i - 1); the label weight on its
    own class equals the share of its own pixels."""
    for seed in range(5):
        torch.manual_seed(seed)
        x, y = constant_images()
        xm, ym = MIXERS[name](x, y, 4, 1.0, rng(seed))
        for i in range(4):
            own = (xm[i] == x[i, 0, 0, 0]).float().mean().item()
            partner = (xm[i] == x[i - 1, 0, 0, 0]).float().mean().item()
            if name != "resizemix":  # resizing blends partner pixels only with themselves too
                assert own + partner == pytest.approx(1.0)
            assert ym[i, i].item() == pytest.approx(own, abs=1e-6), (seed, i)


def test_mixup_is_a_convex_combination_with_the_rolled_batch():
    torch.manual_seed(1)
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8)
    xm, ym = MIXERS["mixup"](x, y, 8, 1.0, rng(1))
    lam = ym[0, 0].item()  # sample 0 keeps weight lambda on its own label
    assert torch.allclose(xm, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)


def test_resizemix_pastes_the_whole_partner_image_shrunk():
    torch.manual_seed(4)
    x = torch.zeros(2, 1, 16, 16)
    x[1, 0, :8] = 1.0  # partner of sample 0: top half bright, bottom half dark
    xm, ym = MIXERS["resizemix"](x, torch.tensor([0, 1]), 2, 1.0, rng(4))
    changed = (xm[0, 0] != 0).nonzero()
    assert len(changed) > 0
    top, bottom = changed[:, 0].min().item(), changed[:, 0].max().item()
    pasted_rows = round(16 * math.sqrt(1 - ym[0, 0].item()))  # square patch: side from the area
    # the bright half of the partner lands in the top half of the pasted square
    assert bottom - top + 1 <= pasted_rows and bottom - top + 1 >= pasted_rows // 2 - 1


def test_saliency_is_highest_at_the_odd_spot_and_saliencymix_boxes_it():
    x = torch.zeros(2, 1, 16, 16)
    x[1, 0, 11, 4] = 5.0  # the partner of sample 0 has one salient spot
    sal = spectral_residual_saliency(x[1:])[0]
    r, c = divmod(sal.argmax().item(), 16)
    assert abs(r - 11) <= 1 and abs(c - 4) <= 1  # the final 3x3 smoothing makes a plateau
    torch.manual_seed(0)
    xm, _ = MIXERS["saliencymix"](x, torch.tensor([0, 1]), 2, 1.0, rng(0))
    assert xm[0, 0, 11, 4] == 5.0, "the box pasted into sample 0 contains the partner's salient spot"


def test_fmix_mask_is_binary_keeps_lambda_and_is_low_frequency():
    torch.manual_seed(0)
    mask = fourier_mask(32, 32, 0.3, rng(0))
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask.mean().item() == pytest.approx(0.3, abs=1 / 1024)
    # low frequency: far fewer 0/1 boundaries between neighbours than a random mask of that share
    edges = (mask[..., 1:] != mask[..., :-1]).float().mean()
    assert edges < 0.2


def test_gridmix_is_constant_on_grid_cells():
    for seed in range(5):
        torch.manual_seed(seed)
        x, y = constant_images(size=12)
        xm, _ = MIXERS["gridmix"](x, y, 4, 1.0, rng(seed))
        # 12 is divisible by 2, 3 and 4: every cell is a block of whole pixels, all one source
        for g in (2, 3, 4):
            blocks = xm[:, 0].unfold(1, 12 // g, 12 // g).unfold(2, 12 // g, 12 // g)
            flat = blocks.reshape(4, g, g, -1)
            if (flat.amax(-1) == flat.amin(-1)).all():
                break
        else:
            pytest.fail("no grid size gives constant cells")


def test_smoothmix_blends_through_a_gaussian_blob():
    torch.manual_seed(2)
    x, y = constant_images(n=2, size=16)
    xm, ym = MIXERS["smoothmix"](x, y, 2, 1.0, rng(1))
    share_partner = (xm[0] - x[0]) / (x[1] - x[0])  # per pixel: how much of the partner shows
    assert share_partner.min() >= 0 and share_partner.max() <= 1
    assert 0 < share_partner.max() and share_partner.std() > 0, "a soft blob, not a constant"
    peak = share_partner[0].flatten().argmax()
    r, c = divmod(peak.item(), 16)
    assert share_partner[0, r, c] >= share_partner[0, min(r + 3, 15), c] - 1e-6, "decays from its centre"
    assert ym[0, 1].item() == pytest.approx(share_partner.mean().item(), abs=1e-5)


def test_manifold_mixup_mixes_the_drawn_hidden_layer():
    torch.manual_seed(0)
    model = SmallCNN(1, 6, 4).eval()
    mixer = build_mixer("manifold_mixup")
    handles = mixer.attach(model)
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    generator = rng(0)
    for _ in range(20):
        _, targets = mixer(x, y, 6, 1.0, generator)
        if mixer.pending is not None:
            break
    layer, lam = mixer.pending
    out = model(x)
    assert mixer.pending is None, "mixes once per armed batch"
    # reference: run block by block and mix by hand after the drawn block
    h, blocks = x, list(model.body)
    hidden_index = {id(m): i + 1 for i, m in enumerate(model.mix_layers())}
    for block in blocks:
        h = block(h)
        if hidden_index.get(id(block)) == layer:
            h = lam * h + (1 - lam) * h.roll(1, 0)
    assert torch.allclose(out, model.classifier(h), atol=1e-5)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert targets[0, y[0]].item() == pytest.approx(lam, abs=1e-6)
    for hd in handles:
        hd.remove()


def test_no_mixing_is_one_hot():
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 2, 1, 2])
    xm, ym = MIXERS["none"](x, y, 3, 1.0, rng(1))
    assert torch.equal(xm, x) and torch.equal(ym.argmax(1), y)


def test_label_smoothing_spreads_epsilon_uniformly():
    t = F.one_hot(torch.tensor([1, 0]), 4).float()
    s = smooth(t, 0.2)
    assert torch.allclose(s[0], torch.tensor([0.05, 0.85, 0.05, 0.05]))
    logits = torch.randn(2, 4)
    targets = torch.stack([t, t], 1)
    assert soft_ce(logits, targets, 0.2).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([1, 0]), label_smoothing=0.2).item(), rel=1e-6)


def test_decoupled_loss_matches_openmixups_definition():
    """Worked from openmixup's soft_mix_cross_entropy (Westlake-AI/openmixup,
    openmixup/models/losses/cross_entropy_loss.py): rows mixed from two classes get the soft CE
    plus eta times, per mixed class, the CE over that class and the unmixed ones; one-hot rows
    (a pair of one class) get the soft CE alone; the two groups' means are added."""
    torch.manual_seed(0)
    logits = torch.randn(4, 5)
    mixed = torch.tensor([[0.7, 0.3, 0, 0, 0], [0, 0, 1.0, 0, 0], [0, 0.1, 0, 0, 0.9], [0, 0, 0, 1.0, 0]])
    targets = torch.stack([mixed, torch.zeros(4, 5)], 1)
    eta = 0.5
    ce = [-(mixed[i] * logits[i].log_softmax(0)).sum().item() for i in range(4)]
    two_class = []
    for i in (0, 2):
        classes = mixed[i].nonzero().flatten().tolist()
        dm = 0.0
        for c in classes:  # softmax over c and the classes not in the mix
            keep = [j for j in range(5) if j == c or j not in classes]
            dm -= logits[i, keep].log_softmax(0)[keep.index(c)].item()
        two_class.append(ce[i] + eta * dm)
    expected = sum(two_class) / 2 + (ce[1] + ce[3]) / 2
    assert decoupled(logits, targets, 0.0, eta=eta).item() == pytest.approx(expected, rel=1e-5)
    # a batch of one-hot rows only is plain cross-entropy
    one_hot = torch.stack([F.one_hot(torch.tensor([2, 3]), 5).float()] * 2, 1)
    assert decoupled(logits[:2], one_hot, 0.0, eta=eta).item() == pytest.approx(
        F.cross_entropy(logits[:2], torch.tensor([2, 3])).item(), rel=1e-6)


def test_rankmixup_penalises_mixed_samples_more_confident_than_clean_ones():
    clean = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
    mixed = torch.tensor([[0.0, 0.5], [3.0, 0.0]])  # sample 1's mixed version is more confident
    targets = torch.stack([torch.full((2, 2), 0.5), torch.eye(2)], 1)
    margin = 0.1
    conf = lambda z: z.softmax(1).amax(1)  # noqa: E731
    expected_rank = torch.relu(conf(mixed) - conf(clean) + margin).mean()
    ce = F.cross_entropy(clean, torch.tensor([0, 1]))
    got = rankmixup(torch.cat([mixed, clean]), targets, 0.0, margin=margin, weight=2.0)
    assert got.item() == pytest.approx((ce + 2.0 * expected_rank).item(), rel=1e-6)
    assert expected_rank > 0


def test_mixer_list_draws_each_mixer_with_its_probability():
    torch.manual_seed(0)
    recipe = MixRecipe({"none": 0.25, "mixup": 0.75}, 1.0, 4, "soft_ce")
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8) % 4
    unmixed = sum(torch.equal(recipe.batch(x, y)[0], x) for _ in range(400))
    assert 70 <= unmixed <= 130  # 100 expected


def test_recipe_appends_clean_images_when_the_loss_needs_them():
    recipe = MixRecipe({"mixup": 1.0}, 1.0, 4, "rankmixup", {"margin": 0.1})
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8) % 4
    inputs, targets = recipe.batch(x, y)
    assert inputs.shape[0] == 16 and torch.equal(inputs[8:], x)
    assert targets.shape == (8, 2, 4) and torch.equal(targets[:, 1].argmax(1), y)
    assert set(MIX_LOSSES.names()) == {"decoupled", "rankmixup", "soft_ce"}


class Replay:
    """A numpy-Generator stand-in that hands out given draws, to feed a mixer torchvision's."""

    def __init__(self, beta, integers):
        self._beta, self._integers = beta, list(integers)

    def beta(self, a, b):
        return self._beta

    def integers(self, *args):
        return self._integers.pop(0)


@pytest.mark.parametrize("seed", range(6))
def test_mixup_and_cutmix_equal_torchvisions_given_the_same_draws(seed):
    """Checked against torchvision.transforms.v2, which we did not write: its MixUp and CutMix
    draw lambda ~ Beta(alpha, alpha), then (CutMix) the box centre x, then y, from torch's
    global RNG. Replaying those draws into our mixers must give identical images and labels."""
    from torchvision.transforms import v2

    x, y = torch.rand(8, 3, 12, 10), torch.arange(8) % 5
    alpha = 0.8
    torch.manual_seed(seed)
    lam = float(torch.distributions.Beta(torch.tensor([alpha]), torch.tensor([alpha])).sample(()))
    r_x, r_y = int(torch.randint(10, size=(1,))), int(torch.randint(12, size=(1,)))
    torch.manual_seed(seed)
    ref_x, ref_y = v2.CutMix(alpha=alpha, num_classes=5)(x, y)
    got_x, got_y = MIXERS["cutmix"](x, y, 5, alpha, Replay(lam, [r_y, r_x]))
    assert torch.equal(got_x, ref_x)
    assert torch.allclose(got_y, ref_y, atol=1e-6)
    torch.manual_seed(seed)
    ref_x, ref_y = v2.MixUp(alpha=alpha, num_classes=5)(x, y)
    got_x, got_y = MIXERS["mixup"](x, y, 5, alpha, Replay(lam, []))
    assert torch.allclose(got_x, ref_x, atol=1e-6) and torch.allclose(got_y, ref_y, atol=1e-6)
