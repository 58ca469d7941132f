"""Federated rounds on the engine (pipeline.train.rounds) and the client algorithms
(pipeline.methods.federated)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.federated import CLIENT_ALGORITHMS
from pipeline.methods.mix.recipe import MixRecipe
from pipeline.nn.models import SmallCNN
from pipeline.train.combine import combine
from pipeline.train.data_path import BatchSource
from pipeline.train.engine import train_models
from pipeline.train.loop import Schedule
from pipeline.train.rounds import Federation, RoundState, run_round, sample_clients, server_step

CPU = torch.device("cpu")
SIZES = [30, 44, 21, 35]
SCHEDULE = Schedule(epochs=1, batch_size=16, lr=0.05)


def clients():
    g = torch.Generator().manual_seed(0)
    return [BatchSource(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g), CPU)
            for n in SIZES]


def start():
    torch.manual_seed(0)
    return copy.deepcopy(SmallCNN(1, 10, 4).state_dict())


def recipe_for(client, round_):
    return MixRecipe({"mixup": 1.0}, 1.0, 10, "soft_ce", seed=1000 * round_ + client)


def generator_for(client, round_):
    return torch.Generator().manual_seed(7919 * round_ + client)


def params_of(state):
    names = {n for n, _ in SmallCNN(1, 10, 4).named_parameters()}
    return {n: t for n, t in state.items() if n in names}


def stack_of(*states):
    return {n: torch.stack([s[n] for s in states]).requires_grad_() for n in states[0]}


def test_fedprox_term_as_the_authors_code_computes_it():
    """Worked from the FedNTD authors' FedProx client (Lee-Gihun/FedNTD,
    algorithms/fedprox/ClientTrainer.py, _proximal_term): 0.5 * mu * the squared norm of all
    named parameters' differences to the global model, concatenated."""
    global_params = params_of(start())
    torch.manual_seed(1)
    local = params_of(SmallCNN(1, 10, 4).state_dict())
    mu = 0.3
    expected = 0.5 * mu * torch.square(torch.cat([(local[n] - global_params[n]).view(-1, 1) for n in local])).sum()
    penalty = CLIENT_ALGORITHMS["fedprox"](mu=mu).local_terms(global_params, [{}, {}], {}).penalty
    stacked = stack_of(global_params, local)
    got = penalty(stacked, [0, 1])
    assert got[0].item() == 0.0 and got[1].item() == pytest.approx(expected.item(), rel=1e-5)
    got.sum().backward()  # its gradient is mu * (w - w_global)
    for n in local:
        assert torch.allclose(stacked[n].grad[1], mu * (local[n] - global_params[n]), atol=1e-6)
    assert CLIENT_ALGORITHMS["fedavg"]().local_terms(global_params, [{}], {}).empty


ALGORITHMS = [("fedavg", {}), ("fedprox", {"mu": 0.5}), ("scaffold", {}), ("feddyn", {}), ("fedntd", {}),
              ("moon", {"mu": 1.0}), ("fedsol", {}), ("fedsol", {"adaptive": False, "rho": 0.2})]
ROUND_SCHEDULE = Schedule(epochs=1, batch_size=16, lr=0.05, cosine=False, nesterov=False)


@pytest.mark.parametrize("algorithm,options", ALGORITHMS, ids=[f"{a}{o}" for a, o in ALGORITHMS])
def test_every_client_algorithm_trains_the_same_stacked_and_one_by_one(algorithm, options):
    """Three rounds (3 of 4 clients each, uneven shards, client state carried over): the
    stacked engine and the one-after-another loop end at the same global model."""
    init, data = start(), clients()
    fed = Federation(client_algorithm=algorithm, client_options=options, sample_fraction=0.75, seed=1)
    ends = []
    for stack in (True, False):
        state = RoundState(0, init)
        for _ in range(3):
            state, _, _ = run_round(SmallCNN(1, 10, 4), state, data, SIZES, recipe_for, generator_for, ROUND_SCHEDULE,
                                    fed, CPU, stack=stack)
        ends.append(state)
    a, b = ends
    for n in a.global_state:
        assert torch.allclose(a.global_state[n].float(), b.global_state[n].float(), atol=5e-6, rtol=1e-4), n
    assert not torch.equal(a.global_state["classifier.weight"], init["classifier.weight"])
    keeps_state = algorithm in ("scaffold", "feddyn", "moon")
    assert bool(a.client_states) == keeps_state and len(a.client_states) == (4 if keeps_state else 0)
    for i, s in a.client_states.items():
        assert all(torch.allclose(s[k], b.client_states[i][k], atol=5e-6, rtol=1e-4) for k in s)


def test_scaffold_as_the_authors_code_computes_it():
    """Worked from Lee-Gihun/FedNTD algorithms/scaffold: each step's gradient gets - c_i + c
    before the optimiser; c_i+ = c_i - c + (w_server - w_local) / (K' lr) with the adaptive
    K' = (K - rho (1 - rho^K) / (1 - rho)) / (1 - rho); the server adds sample_ratio times the
    mean of (c_i+ - c_i) to c."""
    g = torch.Generator().manual_seed(2)
    w_global = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g)}
    c = {"c.w": torch.randn(3, 2, generator=g), "c.b": torch.randn(3, generator=g)}
    c_i = {"c.w": torch.randn(3, 2, generator=g), "c.b": torch.randn(3, generator=g)}
    algo = CLIENT_ALGORITHMS["scaffold"]()
    penalty = algo.local_terms(w_global, [c_i], c).penalty
    local = {n: (t + 0.1).requires_grad_() for n, t in w_global.items()}
    penalty({n: t.unsqueeze(0) for n, t in local.items()}, [0]).sum().backward()
    for n in local:
        assert torch.allclose(local[n].grad, c[f"c.{n}"] - c_i[f"c.{n}"])
    trained = {n: t.detach() - 0.3 for n, t in w_global.items()}
    steps, lr, rho = 7, 0.05, 0.9
    new_k = (steps - rho * (1.0 - pow(rho, steps)) / (1.0 - rho)) / (1.0 - rho)
    after = algo.client_state_after(c_i, w_global, trained, steps, lr, rho, c)
    for n in w_global:
        expected = c_i[f"c.{n}"] - c[f"c.{n}"] + (1.0 / (new_k * lr)) * (w_global[n] - trained[n])
        assert torch.allclose(after[f"c.{n}"], expected, atol=1e-5)
    plain = CLIENT_ALGORITHMS["scaffold"](adaptive_division=False).client_state_after(c_i, w_global, trained, steps,
                                                                                      lr, rho, c)
    assert torch.allclose(plain["c.b"], c_i["c.b"] - c["c.b"] + (w_global["b"] - trained["b"]) / (steps * lr), atol=1e-5)
    # server: two of ten clients trained this round
    other_old, other_new = {k: v * 0 for k, v in c_i.items()}, {k: v + 1 for k, v in c_i.items()}
    _, server = algo.server_update({}, w_global, [trained, trained], [c_i, other_old], [after, other_new], 10, c)
    for key in c:
        mean_change = ((after[key] - c_i[key]) + (other_new[key] - other_old[key])) / 2
        assert torch.allclose(server[key], c[key] + 0.2 * mean_change, atol=1e-6)


def test_feddyn_as_the_authors_code_computes_it():
    """Worked from Lee-Gihun/FedNTD algorithms/feddyn: loss - sum(prev_grads * w) + alpha/2
    ||w_server - w||^2; prev_grads -= alpha (w_local - w_server); the server's h -= alpha/N
    sum(w_i - w_server) and the global model is sum(p_i w_i) - h / alpha."""
    g = torch.Generator().manual_seed(3)
    alpha = 0.1
    w_global = {"w": torch.randn(4, generator=g)}
    grads = {"grad.w": torch.randn(4, generator=g)}
    algo = CLIENT_ALGORITHMS["feddyn"](alpha=alpha)
    local = torch.randn(4, generator=g)
    got = algo.local_terms(w_global, [grads], {}).penalty({"w": local.unsqueeze(0)}, [0])
    expected = -(grads["grad.w"] * local).sum() + 0.5 * alpha * (w_global["w"] - local).pow(2).sum()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    trained = [{"w": torch.randn(4, generator=g)} for _ in range(2)]
    after = algo.client_state_after(grads, w_global, trained[0], 5, 0.01, 0.9, {})
    assert torch.allclose(after["grad.w"], grads["grad.w"] - alpha * (trained[0]["w"] - w_global["w"]))
    h0 = {"h.w": torch.randn(4, generator=g)}
    prop = torch.tensor([0.3, 0.7])
    average = {"w": prop[0] * trained[0]["w"] + prop[1] * trained[1]["w"]}
    out, h = algo.server_update(average, w_global, trained, [{}, {}], [{}, {}], 20, h0)
    h_expected = h0["h.w"].clone()
    for t in trained:
        h_expected -= (alpha / 20) * (t["w"] - w_global["w"])
    assert torch.allclose(h["h.w"], h_expected, atol=1e-6)
    assert torch.allclose(out["w"], average["w"] - h_expected / alpha, atol=1e-5)


def test_moon_as_the_authors_criterion_computes_it():
    """Worked from Lee-Gihun/FedNTD algorithms/moon/criterion.py: CE over [cos(z, z_g),
    cos(z, z_prev)] / tau with label 0, batch mean, times mu."""
    g = torch.Generator().manual_seed(4)
    mu, tau = 0.7, 0.5
    z, z_g, z_prev = (torch.randn(6, 5, generator=g) for _ in range(3))
    pos, neg = F.cosine_similarity(z, z_g, dim=-1), F.cosine_similarity(z, z_prev, dim=-1)
    expected = mu * F.cross_entropy(torch.stack([pos, neg], 1) / tau, torch.zeros(6, dtype=torch.long))
    w_global, w_prev = {"g": torch.zeros(1)}, {"prev.g": torch.ones(1)}

    def reference(params, x):  # the global model answers z_g, the previous local model z_prev
        return (z_g if params["g"].flatten()[0] == 0 else z_prev).unsqueeze(0), None

    term = CLIENT_ALGORITHMS["moon"](mu=mu, tau=tau).local_terms(w_global, [w_prev], {}).output_term
    got = term(reference, torch.zeros(1, 6, 1), z.unsqueeze(0), None, None, [0])
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("adaptive", [True, False])
def test_fedsol_perturbation_as_the_authors_sam_computes_it(adaptive):
    """Worked from Lee-Gihun/FedSOL (algorithms/fedsol_adaptive, fedsol_fixed): the gradient g
    of KLDivLoss(batchmean)(log_softmax(logits / 3), softmax(global_logits / 3)), scale =
    rho / (||g|| + 1e-12); the fixed variant perturbs by g * scale (SAM), the adaptive one by
    F.normalize(|w - w_global|, 2, dim=0) * g * scale (their ExpSAM)."""
    torch.manual_seed(5)
    net, global_net = nn.Linear(6, 4), nn.Linear(6, 4)
    x = torch.randn(8, 6)
    rho = 0.4
    kl = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(net(x) / 3, 1), torch.softmax(global_net(x) / 3, 1).detach())
    kl.backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    scale = rho / (torch.norm(torch.stack([g.norm(2) for g in grads.values()]), 2) + 1e-12)
    expected = {}
    for (n, p), (_, q) in zip(net.named_parameters(), global_net.named_parameters()):
        weight = F.normalize((p - q).abs(), 2, dim=0) if adaptive else 1.0
        expected[n] = (weight * grads[n] * scale).detach()

    def forward(params, inputs):  # the Linear layer on a stack of parameter sets
        logits = torch.einsum("mbi,moi->mbo", inputs, params["weight"]) + params["bias"].unsqueeze(1)
        return None, logits

    algo = CLIENT_ALGORITHMS["fedsol"](rho=rho, tau=3.0, adaptive=adaptive)
    perturb = algo.local_terms({n: p.detach() for n, p in global_net.named_parameters()}, [{}], {}).perturbation
    params = {n: p.detach().unsqueeze(0).requires_grad_() for n, p in net.named_parameters()}
    got = perturb(forward, params, x.unsqueeze(0), None, [0])
    for n in expected:
        assert torch.allclose(got[n][0], expected[n], atol=1e-7, rtol=1e-5), n
    # a client still at the global weights (its first step) is not perturbed
    at_global = {n: p.detach().unsqueeze(0).requires_grad_() for n, p in global_net.named_parameters()}
    assert all(v.abs().max() == 0 for v in perturb(forward, at_global, x.unsqueeze(0), None, [0]).values())


def test_not_true_distillation_stacked_drops_every_true_class():
    """One-hot targets: the stacked form equals the per-client NTD loss. A MixUp target with two
    classes: both are dropped (their logits get no distillation gradient)."""
    from pipeline.methods.federated.losses import not_true_distillation, not_true_distillation_stacked

    g = torch.Generator().manual_seed(6)
    logits, global_logits = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    labels = torch.randint(0, 4, (2, 5), generator=g)
    got = not_true_distillation_stacked(logits, global_logits, F.one_hot(labels, 4).float(), 2.0)
    for m in range(2):
        assert got[m].item() == pytest.approx(not_true_distillation(logits[m], global_logits[m], labels[m], 2.0).item(),
                                              rel=1e-5)
    mixed = torch.tensor([[0.6, 0.4, 0.0, 0.0]]).expand(5, 4).unsqueeze(0)
    z = logits[:1].clone().requires_grad_()
    not_true_distillation_stacked(z, global_logits[:1], mixed, 1.0).sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad[..., :2].abs().max() == 0 and z.grad[..., 2:].abs().max() > 0


def test_clients_are_sampled_per_round_from_the_seed():
    assert sample_clients(20, 1.0, 0, 3) == list(range(20))
    a, b = sample_clients(20, 0.5, 0, 3), sample_clients(20, 0.5, 0, 3)
    assert a == b and len(a) == 10 and a == sorted(set(a))
    assert sample_clients(20, 0.5, 0, 4) != a and sample_clients(20, 0.5, 1, 3) != a
    assert len(sample_clients(20, 0.01, 0, 0)) == 1


def test_server_step_is_fedavgm():
    g, agg = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}, {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(5)}
    plain, buffer = server_step(g, agg, {}, 1.0, 0.0, {"w"})
    assert torch.equal(plain["w"], agg["w"]) and plain["n"].item() == 5 and buffer == {}
    # v1 = delta1 = g - agg; w1 = g - lr v1; then v2 = m v1 + delta2
    w1, v1 = server_step(g, agg, {}, 0.5, 0.9, {"w"})
    assert torch.allclose(v1["w"], torch.tensor([1.0, -2.0])) and torch.allclose(w1["w"], torch.tensor([0.5, 3.0]))
    agg2 = {"w": torch.tensor([0.0, 0.0]), "n": torch.tensor(5)}
    w2, v2 = server_step(w1, agg2, v1, 0.5, 0.9, {"w"})
    assert torch.allclose(v2["w"], 0.9 * v1["w"] + (w1["w"] - agg2["w"]))
    assert torch.allclose(w2["w"], w1["w"] - 0.5 * v2["w"])


def test_a_fedavg_round_is_training_then_the_weighted_average():
    init, data = start(), clients()
    fed = Federation(sample_fraction=0.5, seed=3)
    state, sampled, trained = run_round(SmallCNN(1, 10, 4), RoundState(0, init, {}), data, SIZES, recipe_for,
                                        generator_for, SCHEDULE, fed, CPU)
    assert sampled == sample_clients(4, 0.5, 3, 0) and state.round == 1
    by_hand, _ = train_models(SmallCNN(1, 10, 4), [init] * 2, [data[i] for i in sampled],
                              [recipe_for(i, 0) for i in sampled], SCHEDULE, [generator_for(i, 0) for i in sampled], CPU)
    w = torch.tensor([float(SIZES[i]) for i in sampled])
    expected = combine("fedavg", by_hand, init, w / w.sum())
    assert all(torch.allclose(state.global_state[n].float(), expected[n].float(), atol=1e-6) for n in expected)


def test_rounds_resumed_from_a_saved_state_end_as_an_uninterrupted_run(tmp_path):
    """Round by round from a checkpoint written to disk and read back: byte-equal on CPU."""
    from safetensors.torch import load_file, save_file

    init, data = start(), clients()
    fed = Federation(client_algorithm="fedprox", client_options={"mu": 0.1}, sample_fraction=0.5,
                     server_lr=1.0, server_momentum=0.5, seed=1)

    def go(state, rounds):
        for _ in range(rounds):
            state, _, _ = run_round(SmallCNN(1, 10, 4), state, data, SIZES, recipe_for, generator_for, SCHEDULE,
                                    fed, CPU)
        return state

    straight = go(RoundState(0, init, {}), 3)
    two = go(RoundState(0, init, {}), 2)
    save_file({f"g.{n}": t.contiguous() for n, t in two.global_state.items()}
              | {f"v.{n}": t.contiguous() for n, t in two.server_buffer.items()}, str(tmp_path / "round.safetensors"))
    saved = load_file(str(tmp_path / "round.safetensors"))
    resumed = RoundState(two.round, {n[2:]: t for n, t in saved.items() if n.startswith("g.")},
                         {n[2:]: t for n, t in saved.items() if n.startswith("v.")})
    resumed = go(resumed, 1)
    assert resumed.round == straight.round == 3
    assert all(torch.equal(resumed.global_state[n], straight.global_state[n]) for n in straight.global_state)
    assert not torch.equal(straight.global_state["classifier.weight"], two.global_state["classifier.weight"])


def test_not_true_distillation_as_the_authors_ntd_loss_computes_it():
    """Worked from Lee-Gihun/FedNTD (algorithms/fedntd/criterion.py NTD_Loss._ntd_loss and
    utils.refine_as_not_true): drop the true class by gathering the other positions, then
    KLDivLoss(batchmean)(log_softmax(local / tau), softmax(global / tau))."""
    import math

    from pipeline.methods.federated.losses import not_true_distillation

    g = torch.Generator().manual_seed(0)
    logits, global_logits = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    targets = torch.tensor([0, 3, 1, 1, 2])
    tau = 3.0
    total = 0.0
    for i in range(5):
        others = [c for c in range(4) if c != targets[i]]
        zl = [logits[i, c].item() / tau for c in others]
        zg = [global_logits[i, c].item() / tau for c in others]
        log_q = [z - math.log(sum(math.exp(v) for v in zl)) for z in zl]
        p = [math.exp(z) / sum(math.exp(v) for v in zg) for z in zg]
        total += sum(pi * (math.log(pi) - lq) for pi, lq in zip(p, log_q))
    got = not_true_distillation(logits.requires_grad_(), global_logits, targets, tau)
    assert got.item() == pytest.approx(total / 5, rel=1e-5)
    got.backward()
    assert logits.grad[torch.arange(5), targets].abs().max() == 0, "the true class gets no distillation gradient"


def test_fedadam_server_step_as_flowers_fedadam_computes_it():
    """Worked from adap/flower src/py/flwr/server/strategy/fedadam.py (aggregate_fit): delta =
    aggregate - current; m = b1 m + (1 - b1) delta; v = b2 v + (1 - b2) delta^2;
    w = current + eta m / (sqrt(v) + tau), on the learned tensors, two rounds."""
    import numpy as np

    b1, b2, eta, tau = 0.9, 0.99, 0.1, 1e-3
    w = np.array([1.0, -2.0, 0.5])
    aggs = [np.array([0.5, -1.0, 0.7]), np.array([0.2, -0.5, 1.0])]
    m = v = np.zeros(3)
    state, buffer = {"w": torch.tensor(w, dtype=torch.float32)}, {}
    for agg in aggs:
        delta = agg - w
        m = b1 * m + (1 - b1) * delta
        v = b2 * v + (1 - b2) * delta * delta
        w = w + eta * m / (np.sqrt(v) + tau)
        state, buffer = server_step(state, {"w": torch.tensor(agg, dtype=torch.float32)}, buffer, eta, b1, {"w"},
                                    "adam", b2, tau)
        assert np.allclose(state["w"].numpy(), w, atol=1e-5)


@pytest.mark.parametrize("name,k,options", [("ring", 5, {}), ("torus", 12, {}), ("random", 9, {"peers": 2}),
                                            ("complete", 4, {}), ("none", 3, {})])
def test_topologies_are_symmetric_doubly_stochastic_on_their_graph(name, k, options):
    from pipeline.methods.federated import TOPOLOGIES

    w = TOPOLOGIES[name](k, 3, 0, **options)
    assert w.shape == (k, k) and torch.allclose(w, w.T) and (w >= 0).all()
    assert torch.allclose(w.sum(0), torch.ones(k, dtype=w.dtype)) and torch.allclose(w.sum(1), torch.ones(k, dtype=w.dtype))
    neighbours = ((w > 0).sum(1) - 1).tolist()
    expected = {"ring": [2] * k, "torus": [4] * k, "complete": [k - 1] * k, "none": [0] * k}
    if name in expected:
        assert neighbours == expected[name]
    else:  # each node drew 2 peers; links are two-way
        assert min(neighbours) >= 2
        assert torch.equal(w, TOPOLOGIES[name](k, 3, 0, **options)) and not torch.equal(w, TOPOLOGIES[name](k, 4, 0, **options))
    if name == "ring":
        assert [float(w[0, j]) for j in (0, 1, k - 1)] == pytest.approx([1 / 3] * 3)


def test_gossip_applies_the_mixing_matrix_and_keeps_the_average():
    from pipeline.methods.federated import TOPOLOGIES
    from pipeline.train.rounds import gossip

    g = torch.Generator().manual_seed(7)
    nodes = [{"w": torch.randn(3, 2, generator=g), "n": torch.tensor(i)} for i in range(5)]
    w = TOPOLOGIES["ring"](5, 0, 0)
    mixed = gossip(nodes, w)
    for i in range(5):
        expected = sum(float(w[i, j]) * nodes[j]["w"] for j in range(5))
        assert torch.allclose(mixed[i]["w"], expected, atol=1e-6) and mixed[i]["n"].item() == i
    assert torch.allclose(torch.stack([m["w"] for m in mixed]).mean(0), torch.stack([n["w"] for n in nodes]).mean(0),
                          atol=1e-6)
