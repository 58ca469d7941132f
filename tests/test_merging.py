import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.merge.alignment import align_experts, permute, small_cnn_spec, weight_matching
from pipeline.methods.merge.drop_masks import CHUNK, DropMasks
from pipeline.methods.merge.data import MergeData, diagonal_fisher, input_grams
from pipeline.methods.merge import MERGERS
from pipeline.methods.merge.base import per_tensor
from pipeline.methods.merge.sparsify import breadcrumbs_mask, dare_drop, top_magnitude_thresholds
from pipeline.methods.merge.task_vectors import pcb_combine, ties_combine
from pipeline.nn.models import SmallCNN


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
# PCB is not idempotent, in the authors' release as here: even at density 1 each task's
# lowest-scoring entry gets weight 0, so K copies of one model lose that entry's task vector.
NOT_IDEMPOTENT = {"pcb"}


def merge_data(k=3, n=24, seed=0):
    """Real model and data for the mergers that need data: K shards and a validation split."""
    g = torch.Generator().manual_seed(seed)
    shards = [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)) for _ in range(k)]
    x_val, y_val = torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    return MergeData(SmallCNN(1, 10, 4), shards, x_val, y_val, torch.cat([x for x, _ in shards]), 64, seed)


@pytest.mark.parametrize("method", sorted(set(MERGERS.names()) - NOT_IDEMPOTENT))
def test_merging_identical_models_returns_that_model(method):
    base = state(0)
    expert = state(1)
    k = 2 if method == "slerp" else 3
    experts = [copy.deepcopy(expert) for _ in range(k)]
    extra = {"data": merge_data(k)} if "data" in inspect.signature(MERGERS[method]).parameters else {}
    merged = MERGERS[method](experts, base, WEIGHTS[:k] / WEIGHTS[:k].sum(), **extra, **IDENTITY_OPTIONS.get(method, {}))
    for k, v in expert.items():
        assert torch.allclose(merged[k].float(), v.float(), atol=1e-6), k
        assert merged[k].dtype == v.dtype


@pytest.mark.parametrize("method", MERGERS.names())
def test_mergers_leave_their_inputs_untouched(method):
    """Several merges work in place on what they build; none may write into an expert or the base."""
    base, k = state(0), 2 if method == "slerp" else 3
    experts = [state(i) for i in range(1, k + 1)]
    before = copy.deepcopy((base, experts))
    extra = {"data": merge_data(k)} if "data" in inspect.signature(MERGERS[method]).parameters else {}
    MERGERS[method](experts, base, WEIGHTS[:k] / WEIGHTS[:k].sum(), **extra)
    for got, want in zip([base, *experts], [before[0], *before[1]]):
        for name in want:
            assert torch.equal(got[name], want[name]), name


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


def _ties_by_definition(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """TIES written plainly on the whole (K, n) stack with topk, as a reference."""
    keep = max(1, int(round(density * deltas.shape[1])))
    threshold = deltas.abs().topk(keep, dim=1).values[:, -1:]
    trimmed = deltas * (deltas.abs() >= threshold)
    agree = trimmed * trimmed.sum(0).sign() > 0
    return (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


@pytest.mark.parametrize("keep_share", [0.001, 0.2, 0.9])
def test_top_magnitude_thresholds_are_exactly_topks(keep_share):
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(5, 300_000, generator=g)
    rows[1] = rows[1].round(decimals=1)  # many tied magnitudes
    rows[2, :1000] = 50.0  # outliers that skew the sample
    keep = int(keep_share * rows.shape[1])
    expected = rows.abs().topk(keep, dim=1).values[:, -1:]
    assert torch.equal(top_magnitude_thresholds(rows, keep), expected)


def test_top_magnitude_thresholds_fall_back_when_the_sample_misses():
    # Every entry but a few is 0: the sample sees only zeros, so its bracket cannot hold the
    # 10th largest magnitude, and the row must be selected in full.
    rows = torch.zeros(2, 200_000)
    rows[:, ::20_000] = torch.arange(1.0, 11.0)
    assert torch.equal(top_magnitude_thresholds(rows, 10), torch.ones(2, 1))
    assert torch.equal(top_magnitude_thresholds(rows, 3), torch.full((2, 1), 8.0))


def test_blockwise_ties_equals_ties_on_the_whole_stack():
    deltas = torch.randn(4, 200_003, generator=torch.Generator().manual_seed(2))  # several blocks, ragged end
    assert torch.allclose(ties_combine(deltas, 0.2), _ties_by_definition(deltas, 0.2), atol=1e-7)
    assert torch.allclose(ties_combine(deltas, 1.0), _ties_by_definition(deltas, 1.0), atol=1e-7)


def test_mergers_refuse_mismatched_experts():
    with pytest.raises(ValueError, match="different tensors"):
        MERGERS["uniform"]([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], None, torch.tensor([0.5, 0.5]))


def deltas_of(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_dare_keeps_a_density_fraction_rescaled_and_is_unbiased():
    d = torch.randn(2, 100_000)
    out = dare_drop(d, 0.3, 0, "w")
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    q = round(0.3 * 2**16) / 2**16  # the keep probability, 0.3 to a multiple of 2^-16
    assert torch.allclose(out[kept], d[kept] / q)
    assert torch.equal(out, dare_drop(d, 0.3, 0, "w")), "seeded"
    assert not torch.equal(out, dare_drop(d, 0.3, 1, "w")), "another seed drops other entries"
    assert not torch.equal(out, dare_drop(d, 0.3, 0, "v")), "another tensor drops other entries"
    mean = torch.stack([dare_drop(d[:, :50], 0.3, s, "w") for s in range(4000)]).mean(0)
    assert torch.allclose(mean, d[:, :50], atol=0.15), "E[drop-and-rescale] = the task vector"


@pytest.mark.parametrize("density", [0.01, 0.3, 0.9])
def test_drop_masks_keep_density_at_every_position_of_a_64_bit_draw(density):
    """Each 64-bit draw gives four 16-bit uniforms; all four positions must be fair, and
    entries must be independent of their neighbours, within a chunk's stream and across
    chunks' streams and experts."""
    n = 4 * 100_000
    masks = DropMasks(1, "w", n, density)
    keep, second = masks.next().bool(), masks.next().bool()
    assert abs(masks.q - density) <= 2**-17
    for position in range(4):
        share = keep.view(-1, 4)[:, position].float().mean().item()
        assert abs(share - masks.q) < 5 * (masks.q * (1 - masks.q) / 100_000) ** 0.5 + 1e-4, (position, share)
    tolerance = 5 * (masks.q * (1 - masks.q) / n) ** 0.5 + 1e-4
    assert abs((keep[:-1] & keep[1:]).float().mean().item() - masks.q**2) < tolerance, "neighbours independent"
    assert abs((keep & second).float().mean().item() - masks.q**2) < tolerance, "experts independent"
    chunks = keep[: n // CHUNK * CHUNK].view(-1, CHUNK)
    assert abs((chunks[:-1] & chunks[1:]).float().mean().item() - masks.q**2) < tolerance, "chunks independent"


def test_drop_masks_do_not_depend_on_the_thread_count():
    n = 5 * CHUNK + 123  # chunks that two threads cannot share out evenly, and a partial one
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [m.next() for m in [DropMasks(3, "w", n, 0.5)] for _ in range(3)]
        torch.set_num_threads(4)
        four = [m.next() for m in [DropMasks(3, "w", n, 0.5)] for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, four))
    assert not torch.equal(one[0], one[1]), "each expert gets a mask of its own"
    assert set(one[0].unique().tolist()) == {0.0, 1.0}


def test_dare_merges_expert_by_expert_exactly_as_drop_on_the_stack():
    """``dare`` never stacks the experts; it must still equal the definition on the stack, with
    the same masks as ``dare_drop`` draws (so dare and dare_ties drop the same entries)."""
    base, experts = state(0), [state(i) for i in (1, 2, 3)]
    merged = MERGERS["dare"](experts, base, WEIGHTS, density=0.4, scale=0.7, seed=5)
    for key, theta0 in base.items():
        if not theta0.is_floating_point() or "running" in key:
            continue
        deltas = torch.stack([e[key] for e in experts]) - theta0
        want = theta0 + 0.7 * dare_drop(deltas, 0.4, 5, key).sum(0)
        assert torch.allclose(merged[key], want, atol=1e-6), key
    assert not torch.allclose(merged["classifier.weight"],
                              MERGERS["dare"](experts, base, WEIGHTS, density=0.4, scale=0.7, seed=6)["classifier.weight"])


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
    assert breadcrumbs_mask(d, density=0.4, outliers=0.0).tolist() == [[True, False, False, True, False]]
    # density 1 keeps everything: no room left for an outlier cut (mergekit returns the tensor)
    assert breadcrumbs_mask(d, density=1.0, outliers=0.2).tolist() == [[True] * 5]


@pytest.mark.parametrize("density,outliers", [(0.9, 0.01), (0.3, 0.0), (0.5, 0.2)])
def test_breadcrumbs_mask_equals_the_rank_definition_on_large_rows(density, outliers):
    """Rows long enough for the sampled select: the cut must still keep exactly ranks
    [top, top + keep) by magnitude (distinct magnitudes, so no ties)."""
    deltas = torch.randn(3, 100_000, generator=torch.Generator().manual_seed(2))
    n = deltas.shape[1]
    rank = deltas.abs().argsort(dim=1, descending=True).argsort(dim=1)
    top, keep = int(round(outliers * n)), max(1, int(round(density * n)))
    assert torch.equal(breadcrumbs_mask(deltas, density, outliers), (rank >= top) & (rank < top + keep))


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


def test_diagonal_fisher_matches_the_analytic_gradient_of_a_linear_softmax():
    """For logits = W x + b, d log p_y / dW = (e_y - p) x^T: Fisher = mean of its squares,
    with y drawn from the model's own prediction (the same generator draws)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x = torch.randn(10, 4)
    fisher = diagonal_fisher(model, model.state_dict(), x, torch.Generator().manual_seed(5), chunk=4)
    g = torch.Generator().manual_seed(5)
    fw, fb = torch.zeros(3, 4), torch.zeros(3)
    with torch.no_grad():
        for start in range(0, 10, 4):
            xb = x[start : start + 4]
            p = model(xb).softmax(-1)
            yb = torch.multinomial(p, 1, generator=g).squeeze(1)
            r = torch.nn.functional.one_hot(yb, 3).float() - p
            fw += (r[:, :, None] * xb[:, None, :]).pow(2).sum(0)
            fb += r.pow(2).sum(0)
    assert torch.allclose(fisher["0.weight"], fw / 10, atol=1e-6)
    assert torch.allclose(fisher["0.bias"], fb / 10, atol=1e-6)


def test_fisher_merge_weights_each_parameter_by_its_fisher():
    data = merge_data()
    experts = [state(i) for i in (1, 2, 3)]
    merged = MERGERS["fisher"](experts, state(0), WEIGHTS, data=data, samples=24, floor=1e-8)
    fishers = [data.fisher(k, e, 24) for k, e in enumerate(experts)]
    key = "body.1.0.weight"
    f = torch.stack([fk[key] for fk in fishers]) + 1e-8
    expected = (f * torch.stack([e[key] for e in experts])).sum(0) / f.sum(0)
    assert torch.allclose(merged[key], expected, atol=1e-6)
    assert not torch.allclose(merged[key], sum(e[key] for e in experts) / 3, atol=1e-4), "not a plain average"


def test_regmean_solves_the_least_squares_of_every_experts_outputs():
    """With alpha = 1, RegMean's weight minimises sum_k ||X_k W^T - X_k W_k^T||^2 (here
    checked against lstsq on the stacked inputs), also for a conv on its unfolded patches."""
    data = merge_data()
    experts = [state(i) for i in (1, 2, 3)]
    merged = MERGERS["regmean"](experts, state(0), WEIGHTS, data=data, alpha=1.0)
    for key, layer in (("classifier.weight", "classifier"), ("body.1.0.weight", "body.1.0")):
        xs, ys = [], []
        for k, e in enumerate(experts):
            captured = []
            model = data.model
            model.load_state_dict(e)
            model.eval()
            module = dict(model.named_modules())[layer]
            h = module.register_forward_pre_hook(lambda _, i: captured.append(i[0]))
            with torch.no_grad():
                model(data.shards[k][0])
            h.remove()
            a = captured[0]
            if isinstance(module, torch.nn.Conv2d):
                a = torch.nn.functional.unfold(a, 3, padding=1).transpose(1, 2).reshape(-1, a.shape[1] * 9)
            w = e[key].reshape(e[key].shape[0], -1)
            xs.append(a)
            ys.append(a @ w.T)
        solution = torch.linalg.lstsq(torch.cat(xs).double(), torch.cat(ys).double()).solution.T
        got = merged[key].reshape(solution.shape).double()
        assert torch.allclose(got, solution, atol=1e-3, rtol=1e-3), key
    # the Gram matrices the merger used are X^T X of those inputs
    grams = input_grams(data.model, experts[0], data.shards[0][0])
    assert grams["classifier"].shape == (16, 16) and grams["body.1.0"].shape == (36, 36)


def test_greedy_soup_leaves_out_an_expert_that_hurts_validation_accuracy():
    """Experts 0-2 are copies trained to fit the validation labels; expert 3 is noise.
    The soup starts from the best and adds an expert only if accuracy does not drop."""
    data = merge_data(k=4)
    model = data.model
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x_val), data.y_val).backward()
        opt.step()
    good = {k: v.clone() for k, v in model.state_dict().items()}
    noise = {k: (v + 3 * torch.randn_like(v)) if v.is_floating_point() else v for k, v in good.items()}
    experts = [good, good, noise, good]
    merged = MERGERS["greedy_soup"](experts, None, torch.full((4,), 0.25), data=data)
    assert data.notes["greedy_soup"]["experts"] == [0, 1, 3]
    assert torch.allclose(merged["classifier.weight"], good["classifier.weight"], atol=1e-6)
    assert data.notes["greedy_soup"]["val_accuracy"] > data.val_accuracy(noise)


def pcb_release(rows, density, r=1e-4):
    """PCB_merge of the authors' release (duguodong7/pcb-merging, pcb-merging.py), transcribed
    into plain Python on lists: clamp(|x|, r, r), sign back, normalize(.)**2 -> exp(n * .),
    tanh(x * column sum), clamp(score, 1 - ratio, 0) and normalize, weighted mean."""
    k, n = len(rows), len(rows[0])

    def clamp_rows(m, min_ratio, max_ratio):
        out = []
        for row in m:
            s = sorted(row)
            lo, hi = s[int(n * min_ratio)], s[int(n * (1 - max_ratio) - 1)]
            out.append([min(max(v, lo), hi) for v in row])
        return out

    def normalize_rows(m):
        return [[(v - min(row)) / (max(row) - min(row)) for v in row] for row in m]

    mag = clamp_rows([[abs(v) for v in row] for row in rows], r, r)
    clamped = [[math.copysign(m, v) for m, v in zip(mr, row)] for mr, row in zip(mag, rows)]
    intra = [[math.exp(k * v**2) for v in row] for row in normalize_rows(mag)]
    col = [sum(rows[i][j] for i in range(k)) for j in range(n)]
    score = [[intra[i][j] * math.tanh(rows[i][j] * col[j]) for j in range(n)] for i in range(k)]
    scale = normalize_rows(clamp_rows(score, 1 - density, 0))
    return [sum(scale[i][j] * clamped[i][j] for i in range(k)) / max(sum(scale[i][j] for i in range(k)), 1e-12)
            for j in range(n)]


def test_pcb_against_the_authors_release_worked_by_hand():
    # Entry 0 is the case: two tasks move +1e-3, one -1.5e-3 against them. The release's
    # signed tanh term drops the opposing task and the merge is 1e-3; a softmax over tasks
    # would keep all three and give their mean, 1.67e-4.
    rows = [[1e-3, 2e-3, -5e-4, 3e-3], [1e-3, -1e-3, 2e-3, 5e-4], [-1.5e-3, 1e-3, 1e-3, 2e-3]]
    got = pcb_combine(torch.tensor(rows, dtype=torch.float64), density=0.75)
    assert got[0].item() == pytest.approx(1e-3, rel=1e-6)  # float32 arithmetic
    assert got.tolist() == pytest.approx(pcb_release(rows, 0.75), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_pcb_equals_the_release_on_random_task_vectors(density):
    g = torch.Generator().manual_seed(7)
    deltas = torch.randn(4, 300, generator=g, dtype=torch.float64) * 1e-3
    expected = pcb_release(deltas.tolist(), density)
    assert pcb_combine(deltas, density).tolist() == pytest.approx(expected, rel=1e-5, abs=1e-12)  # float32


def test_pcb_blockwise_equals_the_release_on_a_large_tensor():
    """Over many column blocks (and the topk/kthvalue selects), pcb_combine must still equal the
    release's steps done on the whole (K, n) matrix with sorts, as PCB_merge does them."""
    deltas = torch.randn(3, 300_000, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 1e-3
    k, n, density, r = 3, 300_000, 0.3, 1e-4
    mag = deltas.abs()
    s = mag.sort(dim=1).values
    mag = torch.minimum(torch.maximum(mag, s[:, int(n * r)].unsqueeze(1)), s[:, int(n * (1 - r) - 1)].unsqueeze(1))
    norm = lambda m: (m - m.amin(1, keepdim=True)) / (m.amax(1, keepdim=True) - m.amin(1, keepdim=True))  # noqa: E731
    score = torch.exp(k * norm(mag) ** 2) * torch.tanh(deltas * deltas.sum(0))
    thr = score.sort(dim=1).values[:, int(n * (1 - density))].unsqueeze(1)
    scale = norm(torch.maximum(score, thr))
    expected = (deltas.sign() * mag * scale).sum(0) / scale.sum(0).clamp(min=1e-12)
    assert torch.allclose(pcb_combine(deltas, density).double(), expected, rtol=1e-4, atol=1e-9)


def test_weight_matching_undoes_a_random_permutation_of_hidden_units():
    reference = state(1)
    spec = small_cnn_spec(reference)
    g = torch.Generator().manual_seed(0)
    scramble = {grp: torch.randperm(reference[m[0][0]].shape[0], generator=g) for grp, m in spec.items()}
    scrambled = permute(reference, spec, scramble)
    model = SmallCNN(1, 10, 4).eval()
    x = torch.randn(5, 1, 8, 8)
    model.load_state_dict(reference)
    before = model(x)
    model.load_state_dict(scrambled)
    assert torch.allclose(model(x), before, atol=1e-5), "a permutation keeps the function"
    assert not torch.equal(scrambled["body.0.0.weight"], reference["body.0.0.weight"])
    aligned, moved = align_experts("small_cnn", reference, [scrambled, reference])
    assert moved == [True, False]
    for key in reference:
        assert torch.equal(aligned[0][key], reference[key]), key
    with pytest.raises(ValueError, match="permutation spec"):
        align_experts("resnet18_cifar", reference, [scrambled])
    perms = weight_matching(reference, scrambled, spec)
    assert all(torch.equal(scramble[grp][perms[grp]], torch.arange(len(perms[grp]))) for grp in spec)


def test_stacks_share_one_buffer_without_leaking_views_of_it():
    """per_tensor reuses one stack buffer across tensors; a combine that returns a view of
    the stack must still get its own copy, or the next tensor's stack would overwrite it."""
    experts = [{"a": torch.full((3,), float(i)), "b": torch.full((2, 3), 10.0 + i), "c": torch.tensor(i)}
               for i in range(3)]
    merged = per_tensor(experts, lambda _, stacked: stacked[1])
    assert torch.equal(merged["a"], torch.full((3,), 1.0))
    assert torch.equal(merged["b"], torch.full((2, 3), 11.0))
    assert torch.equal(merged["c"], torch.tensor(0))
    deltas = per_tensor(experts, lambda _, stacked: stacked.sum(0), base=experts[0])
    assert torch.equal(deltas["b"], torch.full((2, 3), 3.0)), "with a base, the stack holds task vectors"


def test_ties_elects_plus_where_the_signs_cancel_as_mergekit_does():
    deltas = torch.tensor([[0.3, 0.5], [-0.3, -0.2]])  # entry 0 sums to exactly 0
    merged = ties_combine(deltas, density=1.0)
    assert merged[0].item() == pytest.approx(0.3)  # + elected: the mean of the positive entries
    assert merged[1].item() == pytest.approx(0.5)


def test_model_stock_moves_away_from_the_mean_when_task_vectors_oppose():
    base = {"w": torch.zeros(2)}
    experts = [{"w": torch.tensor([1.0, 0.2])}, {"w": torch.tensor([-1.0, 0.0])}]
    merged = MERGERS["model_stock"](experts, base, torch.tensor([0.5, 0.5]))
    cos = F.cosine_similarity(experts[0]["w"], experts[1]["w"], dim=0).item()
    t = 2 * cos / (1 + cos)
    assert cos < 0 and t < 0
    assert torch.allclose(merged["w"], t * torch.tensor([0.0, 0.1]))


def test_breadcrumbs_keeps_density_when_density_and_outliers_exceed_one():
    # mergekit: when density + outliers > 1 the outlier cut shrinks so that `density` is kept:
    # here 100 outliers instead of 200, and nothing small is dropped
    deltas = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0))
    mask = breadcrumbs_mask(deltas, density=0.9, outliers=0.2)
    assert mask.sum(1).tolist() == [900, 900]
    magnitude = deltas.abs()
    for row, keep in zip(magnitude, mask):
        assert row[keep].max() < row[~keep].min()  # the 100 dropped are the largest


def test_combine_hands_base_seed_to_the_mergers_that_draw():
    from pipeline.train.combine import combine, merger_takes

    base, experts = state(0), [state(i) for i in (1, 2, 3)]
    assert merger_takes("dare", "seed") and merger_takes("dare_ties", "seed") and not merger_takes("ties", "seed")
    a = combine("dare", experts, base, WEIGHTS, {"density": 0.5}, seed=0)
    b = combine("dare", experts, base, WEIGHTS, {"density": 0.5}, seed=0)
    c = combine("dare", experts, base, WEIGHTS, {"density": 0.5}, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["body.0.0.weight"], c["body.0.0.weight"])
    with pytest.raises(ValueError, match="needs data"):
        combine("fisher", experts, base, WEIGHTS)


def test_the_merge_stage_draws_dare_masks_from_base_seed(tmp_path, monkeypatch, request):
    """Through the stage: the same experts merged under two values of base.seed give two DARE
    merges; the same seed gives the same bytes."""
    import yaml

    from pipeline import merge, mix_train, prepare, pretrain
    from tests.conftest import REPO, forget_mlflow_tracking_uri, set_key

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {"base.shards": [0, 1], "pretrain.epochs": 1, "pretrain.width": 4, "mix_train.epochs": 1,
                       "merge.registered_model": None, "merge.bn_recalibration": False,
                       "merge.mergers": {"dare": {"method": "dare", "density": 0.5}}}.items():
        set_key(params, key, value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    request.addfinalizer(forget_mlflow_tracking_uri)
    for stage, argv in ((prepare, []), (pretrain, []), (mix_train, ["--shard", "0", "1"])):
        stage.main(argv)

    def merged_with(seed: int) -> bytes:
        set_key(params, "base.seed", seed)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        merge.main([])
        return (tmp_path / "data" / "merged" / "dare.safetensors").read_bytes()

    first = merged_with(0)
    assert merged_with(1) != first
    assert merged_with(0) == first
