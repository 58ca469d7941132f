import numpy as np
import pytest

from pipeline.methods.partition.schemes import PARTITIONERS, label_histograms, partition_hash
from pipeline.prepare import heterogeneity

LABELS = np.repeat(np.arange(10), 60)  # 600 samples, 10 balanced classes
OPTS = {"alpha": 0.5, "classes_per_shard": 3, "min_shard_size": 1}


@pytest.mark.parametrize("method", PARTITIONERS.names())
def test_disjoint_and_complete(method):
    shards = PARTITIONERS[method](LABELS, 5, np.random.default_rng(0), **OPTS)
    assert len(shards) == 5
    allidx = np.concatenate(shards)
    assert len(allidx) == len(LABELS), "every sample is in exactly one shard"
    assert len(np.unique(allidx)) == len(LABELS)
    assert all((np.diff(s) > 0).all() for s in shards), "indices are sorted"


@pytest.mark.parametrize("method", PARTITIONERS.names())
def test_seeded(method):
    a = PARTITIONERS[method](LABELS, 4, np.random.default_rng(7), **OPTS)
    b = PARTITIONERS[method](LABELS, 4, np.random.default_rng(7), **OPTS)
    c = PARTITIONERS[method](LABELS, 4, np.random.default_rng(8), **OPTS)
    assert partition_hash(a) == partition_hash(b)
    assert partition_hash(a) != partition_hash(c)


def test_dirichlet_small_alpha_is_skewed():
    def het(alpha):
        shards = PARTITIONERS["dirichlet"](LABELS, 5, np.random.default_rng(0), alpha=alpha)
        return heterogeneity(label_histograms(LABELS, shards, 10))

    iid = PARTITIONERS["iid"](LABELS, 5, np.random.default_rng(0))
    assert het(0.05) > 0.6 > het(100.0)
    assert het(100.0) < 0.15
    assert heterogeneity(label_histograms(LABELS, iid, 10)) < 0.15


def test_pathological_gives_exact_class_counts():
    shards = PARTITIONERS["pathological"](LABELS, 5, np.random.default_rng(0), classes_per_shard=2)
    hist = label_histograms(LABELS, shards, 10)
    assert ((hist > 0).sum(1) == 2).all()


def test_pathological_refuses_uncoverable_classes():
    with pytest.raises(ValueError, match="cannot cover"):
        PARTITIONERS["pathological"](LABELS, 2, np.random.default_rng(0), classes_per_shard=2)


def test_dirichlet_min_size_unreachable_is_an_error():
    with pytest.raises(ValueError, match="min_shard_size"):
        PARTITIONERS["dirichlet"](LABELS, 5, np.random.default_rng(0), alpha=0.5, min_shard_size=500, max_draws=5)


def test_quantity_skew_varies_sizes_not_labels():
    def sizes_and_het(alpha):
        shards = PARTITIONERS["quantity_skew"](LABELS, 5, np.random.default_rng(0), alpha=alpha, min_shard_size=20)
        return np.array([len(s) for s in shards]), heterogeneity(label_histograms(LABELS, shards, 10))

    skewed, het_skewed = sizes_and_het(0.3)
    even, het_even = sizes_and_het(1000.0)
    assert skewed.std() > 4 * even.std()
    assert even.max() - even.min() < 40
    assert het_even < 0.1 and het_skewed < 0.35, "labels stay close to the global mix"


def test_dirichlet_clients_draws_each_shards_class_mix_and_keeps_sizes_equal():
    """Hsu et al. 2019: shard k's labels follow q_k ~ Dir(alpha p); shards are equal in size.
    The two Dirichlet schemes differ: per class over shards, sizes vary with the draw."""
    def run(method, alpha):
        shards = PARTITIONERS[method](LABELS, 5, np.random.default_rng(0), alpha=alpha)
        return [len(s) for s in shards], heterogeneity(label_histograms(LABELS, shards, 10))

    sizes, skewed = run("dirichlet_clients", 0.05)
    assert sizes == [120] * 5
    # the concentration per class is alpha * p_c = alpha / 10 here
    assert skewed > 0.6 > run("dirichlet_clients", 1000.0)[1]
    assert run("dirichlet_clients", 1000.0)[1] < 0.15
    assert len(set(run("dirichlet", 0.5)[0])) > 1
    # a shard's largest class share, far above the 0.1 of a balanced mix
    shards = PARTITIONERS["dirichlet_clients"](LABELS, 5, np.random.default_rng(1), alpha=0.1)
    top_share = np.mean([label_histograms(LABELS, [s], 10).max() / len(s) for s in shards])
    assert top_share > 0.4  # of at most 0.5: a class has 60 samples, a shard holds 120
