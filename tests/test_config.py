import sys
from pathlib import Path

import pytest
import yaml

from pipeline.runtime import config
from tests.conftest import default_params, run, set_key


def load_with(tmp_path, stage, dotted, value):
    params = set_key(default_params(), dotted, value) if dotted else default_params()
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return config.load(stage, path)


def test_default_params_are_valid(tmp_path):
    for stage in ("prepare", "pretrain", "mix_train", "merge", "federate", "evaluate"):
        base, cfg = load_with(tmp_path, stage, None, None)
        assert base.shards == [0, 1, 2, 3]
    _, merge = load_with(tmp_path, "merge", None, None)
    assert merge.mergers["ties"].options == {"density": 0.2, "scale": 1.0}


@pytest.mark.parametrize(
    "stage,key,value,expected",
    [
        ("pretrain", "pretrain.lrr", 0.1, "unknown key pretrain.lrr; allowed: epochs, batch_size, lr"),
        ("pretrain", "pretrain.epochs", "ten", "pretrain.epochs = 'ten': Input should be a valid integer"),
        ("pretrain", "pretrain.epochs", 0, "pretrain.epochs = 0: Input should be greater than 0"),
        ("mix_train", "mix_train.lr", -0.1, "mix_train.lr = -0.1: Input should be greater than 0"),
        ("mix_train", "mix_train.lr", 0, "mix_train.lr = 0: Input should be greater than 0"),
        ("mix_train", "mix_train.mixer", "blend", "mix_train.mixer = 'blend': unknown mixer 'blend'; allowed: cutmix, fmix, gridmix, manifold_mixup, mixup, none"),
        ("mix_train", "mix_train.mixer", {"mixup": 0.5, "blend": 0.5}, "unknown mixer 'blend'"),
        ("mix_train", "mix_train.mixer", {"mixup": 0.5, "cutmix": -1}, "probability of cutmix = -1: must be a finite number greater than 0"),
        ("mix_train", "mix_train.mixer", {"mixup": float("inf")}, "probability of mixup = inf: must be a finite number"),
        ("mix_train", "mix_train.lr", float("inf"), "mix_train.lr = inf: Input should be a finite number"),
        ("mix_train", "mix_train.mix_alpha", float("nan"), "mix_train.mix_alpha = nan: Input should be a finite number"),
        ("pretrain", "pretrain.weight_decay", float("inf"), "pretrain.weight_decay = inf: Input should be a finite"),
        ("merge", "merge.mergers", {"t": {"method": "ties", "density": float("inf")}},
         "merge.mergers.t.density = inf: Input should be a finite number"),
        ("mix_train", "mix_train.label_smoothing", 1.0, "mix_train.label_smoothing = 1.0: Input should be less than 1"),
        ("mix_train", "mix_train.loss", "focal", "loss.method = 'focal': allowed: decoupled, rankmixup, soft_ce"),
        ("mix_train", "mix_train.loss", {"method": "decoupled", "eta": -1}, "loss.eta = -1: Input should be greater than or equal to 0"),
        ("mix_train", "mix_train.loss", {"method": "rankmixup", "eta": 1}, "loss.eta = 1: Extra inputs are not permitted (options of rankmixup: margin, weight)"),
        ("pretrain", "pretrain.method", "byol", "unknown pretrain method 'byol'; allowed: barlow_twins, mixco, mixed_barlow_twins, selfcon, simclr, supcon, supervised"),
        ("pretrain", "pretrain.arch", "vit", "unknown architecture 'vit'"),
        ("prepare", "prepare.partition.alpha", 0, "prepare.partition.alpha = 0: Input should be greater than 0"),
        ("prepare", "prepare.partition.alpha", -1.5, "prepare.partition.alpha = -1.5"),
        ("prepare", "prepare.partition.method", "zipf", "unknown partitioner 'zipf'; allowed: dirichlet, dirichlet_clients, iid, pathological, quantity_skew"),
        ("prepare", "prepare.partition.beta", 1, "unknown key prepare.partition.beta; allowed: method, alpha"),
        ("prepare", "prepare.dataset", "imagenet", "unknown dataset 'imagenet'"),
        ("prepare", "prepare.val_fraction", 0.7, "prepare.val_fraction = 0.7: Input should be less than 0.5"),
        ("prepare", "base.shards", [0, 2], "base.shards = [0, 2]: must be [0, 1, ..., K-1]"),
        ("prepare", "base.shards", [], "base.shards = []"),
        ("prepare", "base.device", "tpu", "base.device = 'tpu': Input should be 'auto', 'cpu' or 'cuda'"),
        ("merge", "merge.mergers.ties.density", 1.5, "ties.density = 1.5: Input should be less than or equal to 1"),
        ("merge", "merge.mergers.ties.sharpness", 2, "ties.sharpness = 2: Extra inputs are not permitted (options of ties: density, scale)"),
        ("merge", "merge.mergers.mine", {"method": "magic"}, "mine.method = 'magic': allowed: breadcrumbs, dare, dare_ties, fedavg, fisher, greedy_soup, model_stock, pcb, regmean, slerp, task_arithmetic, ties, uniform"),
        ("merge", "merge.align", "git_rebasin", "merge.align = 'git_rebasin': Input should be 'none' or 'weight_matching'"),
        ("merge", "merge.mergers.rm", {"method": "regmean", "alpha": 0}, "rm.alpha = 0: Input should be greater than 0"),
        ("merge", "merge.mergers.avg2", {"method": "uniform", "scale": 2}, "avg2.scale = 2: Extra inputs are not permitted (options of uniform: no options)"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(tmp_path, stage, key, value, expected):
    with pytest.raises(config.ConfigError) as e:
        load_with(tmp_path, stage, key, value)
    msg = str(e.value)
    assert expected in msg
    assert "\n" not in msg, "one line"


def test_manifold_mixup_with_rankmixup_is_refused(tmp_path):
    p = tmp_path / "params.yaml"
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["mix_train"].update(mixer={"manifold_mixup": 0.5, "mixup": 0.5}, loss={"method": "rankmixup"})
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(config.ConfigError, match="manifold_mixup cannot be combined with loss rankmixup"):
        config.load("mix_train", p)


def test_unknown_section_and_bad_yaml(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({**default_params(), "prepar": {}}))
    with pytest.raises(config.ConfigError, match="unknown section 'prepar'"):
        config.load("prepare", p)
    p.write_text("base: [unclosed")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load("prepare", p)
    with pytest.raises(config.ConfigError, match="file not found"):
        config.load("prepare", tmp_path / "nope.yaml")


def write_outputs(root):
    out = root / "data" / "prepared"
    out.mkdir(parents=True)
    for name in ("dataset.safetensors", "partition.json", "partition.png"):
        (out / name).write_bytes(b"previous result")
    return out


def assert_refused(proc, root, out, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert all(f.read_bytes() == b"previous result" for f in out.iterdir()), "outputs untouched"
    assert not (root / "mlflow.db").exists(), "nothing recorded for a refused config"


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("prepare.partition.alpha", 0, "prepare.partition.alpha = 0"),
        ("base.shards", list(range(1300)), "base.shards has 1300 shards: more than the 1221 training samples"),
        ("prepare.dataset", "mnist", "prepare.root is not set"),
    ],
)
def test_stage_exits_2_with_one_line_and_keeps_outputs(tmp_path, key, value, needle):
    params = set_key(default_params(), key, value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = write_outputs(tmp_path)
    proc = run([sys.executable, "-m", "pipeline.prepare"], tmp_path)
    assert_refused(proc, tmp_path, out, needle)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "imagefolder"])
def test_missing_dataset_folder_exits_2(tmp_path, dataset):
    params = set_key(default_params(), "prepare.dataset", dataset)
    set_key(params, "prepare.root", str(tmp_path / "no-such-folder"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = write_outputs(tmp_path)
    proc = run([sys.executable, "-m", "pipeline.prepare"], tmp_path)
    assert_refused(proc, tmp_path, out, "no-such-folder")


def test_pathological_that_cannot_cover_the_classes_exits_2(tmp_path):
    params = set_key(default_params(), "prepare.partition.method", "pathological")
    set_key(params, "prepare.partition.classes_per_shard", 1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = write_outputs(tmp_path)
    proc = run([sys.executable, "-m", "pipeline.prepare"], tmp_path)
    assert_refused(proc, tmp_path, out, "cannot cover 10 classes")


def test_a_merger_that_cannot_take_k_experts_is_refused_before_merging(tmp_path):
    from pipeline.merge import check_mergers_accept

    _, cfg = load_with(tmp_path, "merge", "merge.mergers.pair", {"method": "slerp", "t": 0.3})
    with pytest.raises(config.ConfigError, match=r"merge.mergers.pair \(slerp\) with 4 experts: slerp merges exactly 2"):
        check_mergers_accept(cfg, 4)
    check_mergers_accept(cfg.model_copy(update={"mergers": {"pair": cfg.mergers["pair"]}}), 2)  # accepted


def test_federate_runs_take_their_algorithms_options_and_fedadams_defaults(tmp_path):
    import yaml

    from pipeline.runtime import config

    raw = yaml.safe_load(open("params.yaml"))
    raw["federate"]["runs"] = {"adam": {"algorithm": "fedavg", "server_optimizer": "adam", "server_lr": 0.01},
                               "prox": {"algorithm": "fedprox", "mu": 0.5, "aggregator": "ties"}}
    runs = config.load_section(raw, "federate").runs
    assert runs["adam"].server_momentum == 0.9 and runs["adam"].server_beta2 == 0.99
    assert runs["prox"].options == {"mu": 0.5} and runs["prox"].aggregator.method == "ties"
    assert runs["prox"].aggregator.options == {"density": 0.2, "scale": 1.0}  # TIES's defaults, filled in
    raw["federate"]["runs"] = {"adam": {"server_optimizer": "lamb"}}
    with pytest.raises(config.ConfigError, match="server_optimizer"):
        config.load_section(raw, "federate")
