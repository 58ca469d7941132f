"""Federated rounds on the engine (pipeline.train.rounds) and the client algorithms
(pipeline.methods.federated)."""
import copy

import pytest
import torch

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


def test_fedprox_term_as_the_authors_code_computes_it():
    """Worked from the FedNTD authors' FedProx client (Lee-Gihun/FedNTD,
    algorithms/fedprox/ClientTrainer.py, _proximal_term): 0.5 * mu * the squared norm of all
    named parameters' differences to the global model, concatenated."""
    global_params = params_of(start())
    torch.manual_seed(1)
    local = params_of(SmallCNN(1, 10, 4).state_dict())
    mu = 0.3
    expected = 0.5 * mu * torch.square(torch.cat([(local[n] - global_params[n]).view(-1, 1) for n in local])).sum()
    penalty = CLIENT_ALGORITHMS["fedprox"](global_params, mu=mu)
    stacked = {n: torch.stack([global_params[n], local[n]]).requires_grad_() for n in local}
    got = penalty(stacked, [0, 1])
    assert got[0].item() == 0.0 and got[1].item() == pytest.approx(expected.item(), rel=1e-5)
    got.sum().backward()  # its gradient is mu * (w - w_global)
    for n in local:
        assert torch.allclose(stacked[n].grad[1], mu * (local[n] - global_params[n]), atol=1e-6)
    assert CLIENT_ALGORITHMS["fedavg"](global_params) is None


def test_a_penalty_trains_the_same_stacked_and_one_by_one():
    init, data = start(), clients()
    penalty = CLIENT_ALGORITHMS["fedprox"](params_of(init), mu=0.5)

    def train(stack, penalty):
        return train_models(SmallCNN(1, 10, 4), [init] * 4, data, [recipe_for(i, 0) for i in range(4)], SCHEDULE,
                            [generator_for(i, 0) for i in range(4)], CPU, stack=stack, penalty=penalty)

    (a, a_hist), (b, b_hist) = train(True, penalty), train(False, penalty)
    plain, _ = train(True, None)
    for k in range(4):
        assert a_hist[k] == pytest.approx(b_hist[k], rel=1e-4)
        assert all(torch.allclose(a[k][n].float(), b[k][n].float(), atol=2e-5, rtol=1e-4) for n in a[k])
        # the proximal term holds the client closer to the global model
        drift = lambda s: sum((s[n] - init[n]).pow(2).sum() for n in params_of(init))  # noqa: E731
        assert drift(a[k]) < drift(plain[k])


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
