"""params.yaml -> frozen, typed config. A bad value fails at load with one line naming it.

Each stage loads ``base`` plus its own section (DVC hands it only those params).
Method names and options are checked by their family's own registry (pipeline.registry);
each validator imports its registry when it runs, so a stage never pays for a family it does not use.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.runtime.errors import ConfigError  # noqa: E402  (re-exported: config.ConfigError)

SECTIONS = ("base", "prepare", "pretrain", "mix_train", "merge", "federate", "evaluate")


class Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf` or `mix_alpha: .nan` is a bad value, refused at load
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BaseConfig(Strict):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Fixed per process: float results on CPU depend on the thread count, and K shard
    # processes share the cores anyway.
    torch_threads: PositiveInt = 1
    # Training images as one device tensor (resident), or in host memory served by a
    # DataLoader (host, for datasets that do not fit); auto decides by size (pipeline.train.data_path).
    data_path: Literal["auto", "resident", "host"] = "auto"
    loader_workers: NonNegativeInt = 2  # host path: DataLoader worker processes
    # torch.compile the training step's forward (pretrain, mix_train). It pays for its
    # compilation (tens of seconds, again for each new batch shape) only on long GPU runs.
    compile: bool = False
    # K = len(shards). A list, not a count, because DVC's foreach needs a list.
    shards: list[NonNegativeInt] = Field(min_length=1)

    @field_validator("shards")
    @classmethod
    def _consecutive(cls, v: list[int]) -> list[int]:
        if v != list(range(len(v))):
            raise ValueError(f"must be [0, 1, ..., K-1], got {v}")
        return v


class PartitionConfig(Strict):
    method: str = "iid"
    alpha: PositiveFloat = 0.5  # Dirichlet concentration (dirichlet)
    classes_per_shard: PositiveInt = 2  # (pathological)
    min_shard_size: NonNegativeInt = 1  # dirichlet redraws until every shard has this many

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        from pipeline.methods.partition import PARTITIONERS

        return PARTITIONERS.check(v)


class PrepareConfig(Strict):
    dataset: str = "digits"
    root: str | None = None  # local folder for torchvision datasets or an ImageFolder
    download: bool = False
    image_size: PositiveInt | None = None  # ImageFolder: resize to this square size
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    partition: PartitionConfig = PartitionConfig()

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str) -> str:
        from pipeline.io.datasets import DATASETS

        return DATASETS.check(v)


class OptimConfig(Strict):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 0.05
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: NonNegativeFloat = 5e-4


class PretrainConfig(OptimConfig):
    method: str = "supervised"
    arch: str = "small_cnn"
    width: PositiveInt = 32
    temperature: PositiveFloat = 0.5  # SimCLR's NT-Xent temperature
    probe_epochs: PositiveInt = 30  # linear head fitted on frozen features after SSL

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from pipeline.methods.pretrain import OBJECTIVES

        return OBJECTIVES.check(v)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from pipeline.nn.models import ARCHITECTURES

        return ARCHITECTURES.check(v)


class MethodSpec(Strict):
    """A registered method chosen by name, with its keyword options (mergers, mix losses)."""

    method: str
    options: dict[str, Any] = {}


class MixTrainConfig(OptimConfig):
    # One mixer name, or {name: probability}: one mixer drawn per batch with those odds.
    mixer: str | dict[str, PositiveFloat] = "mixup"
    mix_alpha: PositiveFloat = 1.0  # Beta(alpha, alpha) for the mixing ratio
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    loss: MethodSpec = MethodSpec(method="soft_ce")

    @field_validator("mixer", mode="before")
    @classmethod
    def _known(cls, v: Any) -> Any:
        from pipeline.methods.mix import MIXERS

        if isinstance(v, dict):  # checked here: a union's error would only name its first branch
            if not v:
                raise ValueError("an empty mapping; give a mixer name or {name: probability}")
            for name, p in v.items():
                MIXERS.check(name)
                if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p < float("inf"):
                    raise ValueError(f"probability of {name} = {p!r}: must be a finite number greater than 0")
            return v
        if not isinstance(v, str):
            raise ValueError("must be a mixer name or a mapping {name: probability}")
        return MIXERS.check(v)

    @field_validator("loss", mode="before")
    @classmethod
    def _parse_loss(cls, raw: Any) -> Any:
        if isinstance(raw, str):
            raw = {"method": raw}
        from pipeline.methods.mix import MIX_LOSSES

        return _parse_method(MIX_LOSSES, "loss", raw)

    def mixer_odds(self) -> dict[str, float]:
        return dict(self.mixer) if isinstance(self.mixer, dict) else {self.mixer: 1.0}

    @model_validator(mode="after")
    def _hidden_mixing_needs_one_forward(self) -> "MixTrainConfig":
        if "manifold_mixup" in self.mixer_odds() and self.loss.method == "rankmixup":
            raise ValueError("mixer manifold_mixup cannot be combined with loss rankmixup "
                             "(RankMixup's clean images would be mixed at the hidden layer too)")
        return self


class MergeConfig(Strict):
    mergers: dict[str, MethodSpec] = Field(min_length=1)
    align: Literal["none", "weight_matching"] = "none"  # permutation alignment before every merger
    bn_recalibration: bool = True
    bn_batch_size: PositiveInt = 256
    registered_model: str | None = Field("mixmerge-merged", min_length=1)  # null: register nothing (sweeps)

    @field_validator("mergers", mode="before")
    @classmethod
    def _parse(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        from pipeline.methods.merge import MERGERS

        return {name: _parse_method(MERGERS, name, spec) for name, spec in raw.items()}


def _parse_method(registry, name: str, spec: Any) -> MethodSpec:
    """Validate ``{method: ..., **options}`` with the method's registry."""
    if not isinstance(spec, dict) or "method" not in spec:
        raise ValueError(f"{name}: must be a mapping with a 'method' key, got {spec!r}")
    method = spec["method"]
    if method not in registry:
        raise ValueError(f"{name}.method = {method!r}: allowed: {', '.join(registry.names())}")
    try:
        options = registry.options(method, {k: v for k, v in spec.items() if k != "method"})
    except ValueError as e:
        raise ValueError(f"{name}.{e}") from None
    return MethodSpec(method=method, options=options)


# Keys of a federate run that are not its client algorithm's options.
RUN_KEYS = ("algorithm", "topology", "peers", "aggregator", "final_merge", "server_optimizer", "server_lr",
            "server_momentum", "server_beta2", "server_tau")
AVERAGING = ("fedavg", "uniform")  # the aggregators SCAFFOLD's and FedDyn's server updates assume


class FederatedRun(Strict):
    """One federated run (``algorithm``: a client algorithm, its options beside it) or one
    decentralised run (``topology`` set: K nodes gossiping, one ``final_merge`` at the end)."""

    algorithm: str = "fedavg"
    options: dict[str, Any] = {}  # the client algorithm's, validated by its registry
    topology: str | None = None
    peers: PositiveInt = 1  # topology random: peers each node draws per round
    aggregator: MethodSpec | None = None  # None: the section's aggregator
    final_merge: MethodSpec = MethodSpec(method="uniform")  # decentralised: the single global merge
    server_optimizer: Literal["sgd", "adam"] = "sgd"  # sgd: FedAvg / FedAvgM; adam: FedAdam
    server_lr: float = Field(1.0, gt=0, allow_inf_nan=False)  # the server optimiser's learning rate
    server_momentum: float = Field(0.0, ge=0, lt=1)  # FedAvgM's momentum (0: FedAvg); FedAdam's b1 (0.9)
    server_beta2: float = Field(0.99, ge=0, lt=1)  # FedAdam
    server_tau: float = Field(1e-3, gt=0, allow_inf_nan=False)  # FedAdam's adaptivity

    @property
    def decentralised(self) -> bool:
        return self.topology is not None


def _parse_run(name: str, raw: Any, default_aggregator: Any) -> FederatedRun:
    from pipeline.methods.federated import CLIENT_ALGORITHMS, TOPOLOGIES
    from pipeline.methods.merge import MERGERS

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{name}: must be a mapping such as {{algorithm: fedprox, mu: 0.01}}, got {raw!r}")
    algorithm = raw.get("algorithm", "fedavg")
    if algorithm not in CLIENT_ALGORITHMS:
        raise ValueError(f"{name}.algorithm = {algorithm!r}: allowed: {', '.join(CLIENT_ALGORITHMS.names())}")
    try:
        options = CLIENT_ALGORITHMS.options(algorithm, {k: v for k, v in raw.items() if k not in RUN_KEYS})
    except ValueError as e:
        hint = f" (or a run key: {', '.join(RUN_KEYS)})" if "Extra inputs" in str(e) else ""
        raise ValueError(f"{name}.{e}{hint}") from None
    topology = raw.get("topology")
    if topology is not None:
        if topology not in TOPOLOGIES:
            raise ValueError(f"{name}.topology = {topology!r}: allowed: {', '.join(TOPOLOGIES.names())}")
        if algorithm != "fedavg":
            raise ValueError(f"{name}.algorithm = {algorithm!r}: decentralised nodes (topology {topology}) train "
                             f"plain local steps; allowed: fedavg")
    aggregator = raw.get("aggregator", default_aggregator)
    fields = {k: v for k, v in raw.items() if k in RUN_KEYS and k not in ("algorithm", "aggregator", "final_merge")}
    if fields.get("server_optimizer") == "adam":
        fields.setdefault("server_momentum", 0.9)  # FedAdam's b1 (Reddi et al.)
    parsed = {"algorithm": algorithm, "options": options, **fields}
    if aggregator is not None:
        parsed["aggregator"] = _parse_method(MERGERS, f"{name}.aggregator", aggregator if isinstance(aggregator, dict)
                                             else {"method": aggregator})
    if "final_merge" in raw:
        spec = raw["final_merge"]
        parsed["final_merge"] = _parse_method(MERGERS, f"{name}.final_merge",
                                              spec if isinstance(spec, dict) else {"method": spec})
    run = FederatedRun.model_validate(parsed)
    from pipeline.methods.federated import CLIENT_ALGORITHMS as algorithms

    if algorithms[algorithm](**options).requires_averaging and run.aggregator.method not in AVERAGING:
        raise ValueError(f"{name}.aggregator = {run.aggregator.method!r}: {algorithm}'s server update assumes an "
                         f"average of the clients; allowed: {', '.join(AVERAGING)}")
    return run


class FederateConfig(Strict):
    """Rounds of federated (or decentralised) training on the K shards, from the pretrained model."""

    # pretrained: every run starts from the pretrained backbone (as the experts do);
    # scratch: from a fresh initialisation of its architecture (seeded), as federated papers train
    start: Literal["pretrained", "scratch"] = "pretrained"
    rounds: PositiveInt = 10
    # per-round metrics every this many rounds (and after the last): the global model's and the
    # clients' forward passes cost 15-35% of a round at digits' sizes (python -m bench)
    eval_every: PositiveInt = 1
    local_epochs: PositiveInt = 1  # E: each client's (node's) epochs on its shard per round
    sample_fraction: float = Field(1.0, gt=0, le=1)  # clients per round: max(1, int(fraction * K))
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 0.02  # constant within a round
    lr_decay: float = Field(1.0, gt=0, le=1)  # per round (the FedNTD and FedSoL authors use 0.99)
    momentum: float = Field(0.9, ge=0, lt=1)  # heavy ball, as the authors' client SGD
    weight_decay: NonNegativeFloat = 5e-4
    mixer: str = "none"  # the clients' mixer (a mix_train mixer that does not hook the model)
    mix_alpha: PositiveFloat = 1.0
    aggregator: MethodSpec = MethodSpec(method="fedavg")  # any merger; a run may name its own
    runs: dict[str, FederatedRun] = Field(min_length=1)
    registered_model: str | None = Field("mixmerge-federated", min_length=1)  # null: register nothing

    @field_validator("aggregator", mode="before")
    @classmethod
    def _parse_aggregator(cls, raw: Any) -> Any:
        from pipeline.methods.merge import MERGERS

        return _parse_method(MERGERS, "aggregator", raw if isinstance(raw, dict) else {"method": raw})

    @field_validator("mixer")
    @classmethod
    def _known_mixer(cls, v: str) -> str:
        from pipeline.methods.mix import MIXERS

        MIXERS.check(v)
        if v == "manifold_mixup":
            raise ValueError("manifold_mixup hooks the model's layers; federated clients take input-space mixers")
        return v

    @field_validator("runs", mode="before")
    @classmethod
    def _parse_runs(cls, raw: Any, info: ValidationInfo) -> Any:
        if not isinstance(raw, dict):
            return raw
        aggregator = info.data.get("aggregator")
        aggregator = aggregator.model_dump() if aggregator is not None else {"method": "fedavg"}
        aggregator = {"method": aggregator["method"], **aggregator["options"]}
        return {name: _parse_run(name, spec, aggregator) for name, spec in raw.items()}


class EvaluateConfig(Strict):
    ece_bins: PositiveInt = 15
    batch_size: PositiveInt = 512
    interpolation_points: int = Field(5, ge=2)  # per pair of experts, endpoints included
    # What keeps evaluation's cost fixed as the data and K grow (pipeline.evaluation.compare):
    probe_samples: PositiveInt = 5000  # training images the linear probe and kNN are fitted on
    bn_samples: PositiveInt = 2048  # training images BatchNorm is recomputed on along a curve
    interpolation_samples: PositiveInt = 2000  # test images each interpolation point is scored on
    interpolation_pairs: PositiveInt = 6  # expert pairs with curves and diagnostics (a seeded sample)


STAGE_MODELS: dict[str, type[Strict]] = {
    "base": BaseConfig,
    "prepare": PrepareConfig,
    "pretrain": PretrainConfig,
    "mix_train": MixTrainConfig,
    "merge": MergeConfig,
    "federate": FederateConfig,
    "evaluate": EvaluateConfig,
}


def set_key(params: dict, dotted: str, value) -> dict:
    """Set ``a.b.c`` in a nested params mapping (creating sections as needed); returns it."""
    node = params
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return params


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections {', '.join(SECTIONS)}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r}; allowed: {', '.join(SECTIONS)}")
    return raw


def load_section(raw: dict[str, Any], section: str, path: str | Path = "params.yaml") -> Any:
    """Validate one section; raise ConfigError with a one-line 'key = value: problem' message."""
    try:
        return STAGE_MODELS[section].model_validate(raw.get(section) or {})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in (section, *err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(section, err["loc"]))
            raise ConfigError(f"{path}: unknown key {loc}; allowed: {allowed}") from None
        if isinstance(err.get("input"), (dict, list)) and re.match(r"[\w.]+ = ", msg):
            # a nested value's own message names it (``fedprox.mu = -1: ...``): not the whole mapping
            raise ConfigError(f"{path}: {loc}.{msg}") from None
        raise ConfigError(f"{path}: {loc} = {err.get('input')!r}: {msg}") from None


def _allowed_keys(section: str, loc: tuple) -> list[str]:
    model: Any = STAGE_MODELS[section]
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        model = field.annotation
    return list(model.model_fields)


def load(stage: str, path: str | Path = "params.yaml") -> tuple[BaseConfig, Any]:
    raw = read_params(path)
    return load_section(raw, "base", path), load_section(raw, stage, path)
