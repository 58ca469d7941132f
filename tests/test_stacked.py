"""Training K experts stacked must give each expert what training it alone gives
(pipeline.train.stacked, through the engine's train_models)."""
import copy

import pytest
import torch

from pipeline.train.data_path import BatchSource
from pipeline.methods.mix.recipe import MixRecipe
from pipeline.nn.models import SmallCNN
from pipeline.train.engine import can_stack, train_models
from pipeline.train.stacked import _sgd_step, fit_stacked
from pipeline.train.loop import Schedule, fit

CPU = torch.device("cpu")
SIZES = [37, 50, 23]  # unequal shards: different steps per epoch and last-batch sizes
SCHEDULE = Schedule(epochs=3, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4)


def shards():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in SIZES]


RECIPES = {  # mixers by name or {name: probability}, loss, loss options, label smoothing
    "mixup": ({"mixup": 1.0}, "soft_ce", {}, 0.0),
    "cutmix": ({"cutmix": 1.0}, "soft_ce", {}, 0.0),
    "none": ({"none": 1.0}, "soft_ce", {}, 0.0),
    "fmix+gridmix, smoothed": ({"fmix": 0.5, "gridmix": 0.5}, "soft_ce", {}, 0.1),
    "saliencymix, decoupled": ({"saliencymix": 1.0}, "decoupled", {"eta": 0.5}, 0.0),
    "resizemix+smoothmix, rankmixup": ({"resizemix": 0.3, "smoothmix": 0.7}, "rankmixup", {"margin": 0.1}, 0.0),
}


def recipe(name, seed=0):
    mixers, loss, options, smoothing = RECIPES[name]
    return MixRecipe(mixers, 1.0, 10, loss, options, smoothing, seed)


def sources(data, path="resident", workers=0):
    return [BatchSource(x, y, CPU, path, workers) for x, y in data]


def one_by_one(init, data, mixer, path="resident", workers=0):
    """The reference: torch's own SGD (loop.fit), one expert after another, written out here."""
    states, histories = [], []
    for k, source in enumerate(sources(data, path, workers)):
        model = SmallCNN(1, 10, 4)
        model.load_state_dict(init)
        model.train()
        g = torch.Generator().manual_seed(k)
        r = recipe(mixer, 100 + k)  # the expert's mixing stream

        def loss_fn(xb, yb):
            inputs, targets = r.batch(xb, yb)
            return r.loss(model(inputs), targets)

        histories.append(fit(model.parameters(), loss_fn, source, SCHEDULE, g, CPU))
        states.append(copy.deepcopy(model.state_dict()))
    return states, histories


@pytest.mark.parametrize("mixer", list(RECIPES))
def test_stacked_training_matches_training_one_by_one(mixer):
    torch.manual_seed(0)
    init = copy.deepcopy(SmallCNN(1, 10, 4).state_dict())
    data = shards()
    ref_states, ref_hist = one_by_one(init, data, mixer)

    states, hist = stacked(init, sources(data), mixer)
    for k in range(len(SIZES)):
        assert hist[k] == pytest.approx(ref_hist[k], rel=1e-4, abs=1e-5), k
        for name, ref in ref_states[k].items():
            got = states[k][name]
            assert got.dtype == ref.dtype and got.shape == ref.shape, name
            assert torch.allclose(got.float(), ref.float(), atol=2e-5, rtol=1e-4), (k, name, (got - ref).abs().max())
        # and the experts really differ from one another and from the start
        assert not torch.allclose(states[k]["classifier.weight"], init["classifier.weight"])
    assert not torch.allclose(states[0]["classifier.weight"], states[1]["classifier.weight"])


def stacked(init, data, mixer, stack=True):
    return train_models(SmallCNN(1, 10, 4), [init] * len(SIZES), data,
                        [recipe(mixer, 100 + k) for k in range(len(SIZES))], SCHEDULE,
                        [torch.Generator().manual_seed(k) for k in range(len(SIZES))], CPU, stack=stack)


def test_the_engine_trains_one_by_one_what_it_trains_stacked():
    # train_models' two paths: stacked (vmap, its own SGD) and one after another (torch's SGD)
    torch.manual_seed(0)
    init = copy.deepcopy(SmallCNN(1, 10, 4).state_dict())
    data = shards()
    (a, a_hist), (b, b_hist) = stacked(init, sources(data), "cutmix"), stacked(init, sources(data), "cutmix", False)
    for k in range(len(SIZES)):
        assert a_hist[k] == pytest.approx(b_hist[k], rel=1e-4, abs=1e-5)
        assert all(torch.allclose(a[k][n].float(), b[k][n].float(), atol=2e-5, rtol=1e-4) for n in a[k])


def test_the_engine_stacks_only_what_it_can():
    assert can_stack([recipe("mixup", s) for s in range(3)])
    assert not can_stack([recipe("mixup")])  # one model: nothing to stack
    manifold = MixRecipe({"manifold_mixup": 1.0}, 1.0, 10, "soft_ce")
    assert not can_stack([manifold, MixRecipe({"manifold_mixup": 1.0}, 1.0, 10, "soft_ce")])  # hooks the model
    assert not can_stack([recipe("mixup"), recipe("saliencymix, decoupled")])  # two different losses
    with pytest.raises(ValueError, match="cannot be trained stacked"):
        train_models(SmallCNN(1, 10, 4), [{}], [None], [manifold], SCHEDULE, [torch.Generator()], CPU, stack=True)


def test_host_data_path_trains_exactly_what_the_resident_path_trains():
    # The DataLoader path (worker processes gathering batches from host memory) must serve the
    # same batches in the same order, one by one and stacked alike.
    torch.manual_seed(0)
    init = copy.deepcopy(SmallCNN(1, 10, 4).state_dict())
    data = shards()
    resident, resident_hist = one_by_one(init, data, "cutmix")
    host, host_hist = one_by_one(init, data, "cutmix", path="host", workers=2)
    assert host_hist == resident_hist
    for a, b in zip(resident, host):
        assert all(torch.equal(a[n], b[n]) for n in a)
    runs = [stacked(init, sources(data, path, 2), "mixup") for path in ("resident", "host")]
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(a[n], b[n]) for a, b in zip(runs[0][0], runs[1][0]) for n in a)


def test_mixing_draws_come_from_the_recipe_alone():
    # Each expert's recipe owns its stream: the global RNG does not move it, and the seed does.
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 10
    a = recipe("mixup", 1).batch(x, y)
    torch.manual_seed(123)
    torch.rand(100)
    b = recipe("mixup", 1).batch(x, y)
    c = recipe("mixup", 2).batch(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_compiled_stacked_training_matches_eager():
    # base.compile: the vmapped forward through torch.compile trains the same experts.
    torch.manual_seed(0)
    init = copy.deepcopy(SmallCNN(1, 10, 4).state_dict())
    g = torch.Generator().manual_seed(5)
    data = [BatchSource(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g), CPU)
            for _ in range(2)]  # equal full batches: one shape, one compilation
    schedule = Schedule(epochs=1, batch_size=16, lr=0.05)
    def train(compile):
        recipes = [recipe("mixup", 7), recipe("mixup", 8)]
        return fit_stacked(SmallCNN(1, 10, 4), [init] * 2, data, lambda k, x, y: recipes[k].batch(x, y),
                           recipes[0].loss, schedule, [torch.Generator().manual_seed(k) for k in range(2)], CPU,
                           compile=compile)

    (eager, eager_hist), (compiled, compiled_hist) = train(False), train(True)
    assert [h[0] for h in compiled_hist] == pytest.approx([h[0] for h in eager_hist], rel=1e-5)
    for a, b in zip(eager, compiled):
        for n in a:
            assert torch.allclose(a[n].float(), b[n].float(), atol=1e-5), n
    assert not torch.allclose(compiled[0]["classifier.weight"], init["classifier.weight"])


def test_sgd_step_of_all_experts_is_nesterov_sgd_per_expert():
    """When every expert steps and has a momentum buffer, _sgd_step updates in place (no row
    gathers): each expert's rows must follow Nesterov SGD with weight decay at its own rate,
    and the momentum buffer must be updated too."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, 4, 5, generator=g).requires_grad_()
    p.grad = torch.randn(3, 4, 5, generator=g)
    buf = torch.randn(3, 4, 5, generator=g)
    s = Schedule(1, 8, 0.1, momentum=0.9, weight_decay=5e-4)
    lrs = [0.1, 0.05, 0.01]
    d = p.grad + s.weight_decay * p.detach()
    want_buf = s.momentum * buf + d
    want_p = p.detach() - torch.tensor(lrs).view(3, 1, 1) * (d + s.momentum * want_buf)
    momentum_buf = {"w": buf.clone()}
    _sgd_step({"w": p}, momentum_buf, [0, 1, 2], lrs, [True, True, True], s)
    assert torch.allclose(momentum_buf["w"], want_buf, atol=1e-7)
    assert torch.allclose(p.detach(), want_p, atol=1e-7)
