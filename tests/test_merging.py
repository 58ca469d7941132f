import copy

import pytest
import torch

from pipeline.merging import MERGERS, ties_combine
from pipeline.models import SmallCNN


def state(seed):
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in SmallCNN(1, 10, 4).state_dict().items()}


WEIGHTS = torch.tensor([0.5, 0.3, 0.2])


@pytest.mark.parametrize("method", MERGERS.names())
def test_merging_identical_models_returns_that_model(method):
    base = state(0)
    expert = state(1)
    experts = [copy.deepcopy(expert) for _ in range(3)]
    opts = {"scale": 1 / 3} if method == "task_arithmetic" else {"scale": 1.0} if method == "ties" else {}
    if method == "ties":
        opts["density"] = 1.0
    merged = MERGERS[method](experts, base, WEIGHTS, **opts)
    for k, v in expert.items():
        assert torch.allclose(merged[k].float(), v.float(), atol=1e-6), k
        assert merged[k].dtype == v.dtype


def test_weighted_average_matches_hand_computation():
    experts = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)},
               {"w": torch.tensor([3.0, -2.0]), "n": torch.tensor(9)},
               {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(1)}]
    merged = MERGERS["fedavg"](experts, None, WEIGHTS)
    # 0.5*1 + 0.3*3 + 0.2*0 = 1.4 ; 0.5*2 + 0.3*-2 + 0.2*4 = 1.2
    assert torch.allclose(merged["w"], torch.tensor([1.4, 1.2]))
    assert merged["n"].item() == 5, "integer buffers come from expert 0"
    uniform = MERGERS["uniform"](experts, None, WEIGHTS)
    assert torch.allclose(uniform["w"], torch.tensor([4 / 3, 4 / 3]))


def test_task_arithmetic_with_scale_one_over_k_is_the_average():
    base, experts = state(0), [state(i) for i in (1, 2, 3)]
    ta = MERGERS["task_arithmetic"](experts, base, WEIGHTS, scale=1 / 3)
    avg = MERGERS["uniform"](experts, base, WEIGHTS)
    for k in avg:
        if avg[k].is_floating_point():
            assert torch.allclose(ta[k], avg[k], atol=1e-6), k


def test_task_arithmetic_adds_scaled_sum_of_task_vectors():
    base = {"w": torch.tensor([1.0, 1.0])}
    experts = [{"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([1.5, 3.0])}]
    out = MERGERS["task_arithmetic"](experts, base, torch.tensor([0.5, 0.5]), scale=0.5)
    # deltas (1, -1) and (0.5, 2): sum (1.5, 1) -> base + 0.5 * sum = (1.75, 1.5)
    assert torch.allclose(out["w"], torch.tensor([1.75, 1.5]))


def test_ties_worked_example():
    # Three task vectors over 4 parameters (Yadav et al. 2023, steps trim / elect / disjoint mean).
    deltas = torch.tensor([
        [0.9, -0.1, 0.5, -0.8],
        [0.7, 0.2, -0.6, -0.05],
        [-0.3, 0.1, 0.4, 0.6],
    ])
    # density 0.5 keeps the 2 largest magnitudes per row:
    #   row0: 0.9, -0.8 ; row1: 0.7, -0.6 ; row2: 0.4, 0.6
    # elected signs from the trimmed sums: p0 +1.6 -> +, p1 0 -> 0, p2 -0.6+0.4=-0.2 -> -, p3 -0.8+0.6 -> -
    # disjoint means: p0 mean(0.9, 0.7)=0.8 ; p1 0 ; p2 -0.6 ; p3 -0.8
    out = ties_combine(deltas, density=0.5)
    assert torch.allclose(out, torch.tensor([0.8, 0.0, -0.6, -0.8]))


def test_mergers_refuse_mismatched_experts():
    with pytest.raises(ValueError, match="different tensors"):
        MERGERS["uniform"]([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], None, torch.tensor([0.5, 0.5]))
