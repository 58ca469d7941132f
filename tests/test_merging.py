import copy

import pytest
import torch

from pipeline.merging import MERGERS, breadcrumbs_mask, dare_drop, ties_combine
from pipeline.models import SmallCNN


def state(seed):
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in SmallCNN(1, 10, 4).state_dict().items()}


WEIGHTS = torch.tensor([0.5, 0.3, 0.2])


# options under which merging K copies of one model must give that model back
IDENTITY_OPTIONS = {
    "task_arithmetic": {"scale": 1 / 3},
    "ties": {"density": 1.0, "scale": 1.0},
    "dare": {"density": 1.0, "scale": 1 / 3},
    "dare_ties": {"density": 1.0, "scale": 1.0},
    "breadcrumbs": {"density": 1.0, "outliers": 0.0, "scale": 1 / 3},
}


@pytest.mark.parametrize("method", MERGERS.names())
def test_merging_identical_models_returns_that_model(method):
    base = state(0)
    expert = state(1)
    k = 2 if method == "slerp" else 3
    experts = [copy.deepcopy(expert) for _ in range(k)]
    merged = MERGERS[method](experts, base, WEIGHTS[:k] / WEIGHTS[:k].sum(), **IDENTITY_OPTIONS.get(method, {}))
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


def deltas_of(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_dare_keeps_a_density_fraction_rescaled_and_is_unbiased():
    d = torch.randn(2, 100_000)
    out = dare_drop(d, 0.3, torch.Generator().manual_seed(0))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.allclose(out[kept], d[kept] / 0.3)
    assert torch.equal(out, dare_drop(d, 0.3, torch.Generator().manual_seed(0))), "seeded"
    mean = torch.stack([dare_drop(d[:, :50], 0.3, torch.Generator().manual_seed(s)) for s in range(4000)]).mean(0)
    assert torch.allclose(mean, d[:, :50], atol=0.15), "E[drop-and-rescale] = the task vector"


def test_dare_with_density_one_is_task_arithmetic():
    base, experts = state(0), [state(i) for i in (1, 2, 3)]
    a = MERGERS["dare"](experts, base, WEIGHTS, density=1.0, scale=0.4)
    b = MERGERS["task_arithmetic"](experts, base, WEIGHTS, scale=0.4)
    c = MERGERS["dare_ties"](experts, base, WEIGHTS, density=1.0, scale=0.7)
    d = MERGERS["ties"](experts, base, WEIGHTS, density=1.0, scale=0.7)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
        assert torch.allclose(c[k].float(), d[k].float(), atol=1e-6), k


def test_breadcrumbs_drops_outliers_and_small_entries():
    d = deltas_of([0.9, -0.1, 0.5, -0.8, 0.05])
    # outliers 0.2 of 5 -> drop the largest (0.9); density 0.4 -> keep the next 2 (-0.8, 0.5)
    assert breadcrumbs_mask(d, density=0.4, outliers=0.2).tolist() == [[False, False, True, True, False]]


def test_model_stock_interpolates_by_the_angle_between_task_vectors():
    base = {"w": torch.zeros(2)}
    # orthogonal task vectors: cos 0 -> t 0 -> the base
    out = MERGERS["model_stock"]([{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}], base, WEIGHTS[:2])
    assert torch.allclose(out["w"], torch.zeros(2))
    # 45 degrees: cos = 1/sqrt(2), t = 2c / (1 + c), merge = t * mean
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    out = MERGERS["model_stock"]([{"w": e1}, {"w": e2}], base, WEIGHTS[:2])
    c = 1 / 2 ** 0.5
    assert torch.allclose(out["w"], (2 * c / (1 + c)) * (e1 + e2) / 2, atol=1e-6)


def test_slerp_follows_the_arc():
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    mid = MERGERS["slerp"]([a, b], None, WEIGHTS[:2], t=0.5)["w"]
    assert torch.allclose(mid, torch.tensor([2 ** -0.5, 2 ** -0.5]), atol=1e-6), "on the circle, not the chord"
    assert torch.allclose(MERGERS["slerp"]([a, b], None, WEIGHTS[:2], t=1.0)["w"], b["w"], atol=1e-6)
    with pytest.raises(ValueError, match="exactly 2"):
        MERGERS["slerp"]([a, b, a], None, WEIGHTS, t=0.5)
