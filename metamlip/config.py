"""YAML run configurations, validated into typed dataclasses.

Every key is a field of a dataclass below, documented in the README. Unknown keys,
wrong types, values out of range (`VALUE_RULES`) and missing files give an `InputError`
naming the key. `defaults_yaml` prints every key of a config class with its default.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from metamlip.errors import InputError
from metamlip.model.hipnn import HipnnConfig
from metamlip.model.mace_config import LEVEL_EMBEDDING_PLACES, MaceSection
from metamlip.model.new_species import NEW_ELEMENT_MODES
from metamlip.pretrained import checkpoint_or_shipped


@dataclass
class DataSource:
    """One file of labelled structures (see `metamlip.readers.read_dataset`), or, with
    ``format: packed``, one packed level folder written by `metamlip pack`, opened lazily
    (`metamlip.data.sources`; only `levels` applies)."""

    path: str = ""
    format: str | None = None
    level: str | None = None
    levels: list[str] | None = None
    energy_unit: str | None = None
    length_unit: str | None = None
    energy_key: str | None = None
    forces_key: str | None = None

    def reader_options(self) -> dict[str, Any]:
        return {name: value for name, value in dataclasses.asdict(self).items() if name != "path"}


@dataclass
class SplitConfig:
    """Train/validation/test split of each level: a seeded permutation
    (``np.random.RandomState(seed).permutation(n)``, the same as ``np.random.seed(seed);
    np.random.shuffle(np.arange(n))``); the first `train` structures train, the next
    `validation` validate, the rest (or the next `test`) test. Counts, or fractions < 1."""

    seed: int = 0
    train: float = 0.8
    validation: float = 0.1
    test: float | None = None


@dataclass(frozen=True)
class ModelSection(HipnnConfig):
    """The backbone (`hipnn` or `mace`), HIP-NN's shape at the top level (distances in Angstrom, see
    `HipnnConfig`), MACE's under `mace` (see `MaceSection`), number type and initialisation seed.
    `n_level_features`, `dtype` and `seed` apply to either backbone."""

    backbone: str = "hipnn"
    mace: MaceSection = field(default_factory=MaceSection)
    dtype: str = "float32"
    seed: int = 0


@dataclass
class TrainingSection:
    """Optimisation: Adam, plateau learning-rate schedule, early stopping, limits."""

    batch_size: int = 32
    learning_rate: float = 1.0e-3
    energy_weight: float = 1.0
    force_weight: float = 1.0
    max_epochs: int = 1000
    max_wall_seconds: float | None = None
    early_stopping_patience: int = 60
    scheduler_patience: int = 15
    scheduler_factor: float = 0.5
    min_learning_rate: float = 1.0e-5
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    checkpoint_interval_seconds: float = 10.0
    refit_reference: bool = True
    device: str = "cpu"
    tensorboard: bool = False
    compile: bool = False
    native: bool = False


@dataclass
class TrainConfig:
    """`metamlip train`: datasets (one level each, or multi-level files), split, model, training."""

    datasets: list[DataSource] = field(default_factory=list)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    output_dir: str = "runs/train"


def load_config(path: str | Path, cls: type, overrides: list[str] = (), base_dir: Path | None = None):
    """Read YAML at `path`, apply ``key.sub=value`` overrides, and validate into `cls`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such config file" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        mapping = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text (UTF-8) file; a config is YAML") from None
    except yaml.YAMLError as error:
        raise InputError(f"{path}: not valid YAML ({error})".replace("\n", " ")) from None
    if not isinstance(mapping, dict):
        raise InputError(f"{path}: the top level must be a mapping of keys")
    for override in overrides:
        apply_override(mapping, override)
    config = from_mapping(cls, mapping, where=str(path))
    resolve_paths(config, base_dir if base_dir is not None else path.parent)
    return config


def apply_override(mapping: dict, override: str) -> None:
    """Set ``a.b.c=value`` in a nested mapping; the value is parsed as YAML."""
    key, separator, text = override.partition("=")
    if not separator or not key:
        raise InputError(f"--set {override!r}: expected KEY=VALUE, e.g. training.learning_rate=0.002")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise InputError(f"--set {override!r}: the value {text!r} is not valid YAML") from None
    set_dotted_key(mapping, key.strip(), value, where=f"--set {override!r}")


def set_dotted_key(mapping: dict, key: str, value: Any, where: str) -> None:
    """Set ``mapping[a][b][c] = value`` for key ``a.b.c``, creating sections as needed."""
    *parents, leaf = key.split(".")
    target = mapping
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise InputError(f"{where}: {part!r} is not a section")
    target[leaf] = value


def from_mapping(cls: type, mapping: Any, where: str, prefix: str = ""):
    """Build dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(mapping, dict):
        raise InputError(f"{where}: {prefix.rstrip('.') or 'the top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in mapping:
        if key not in known:
            raise InputError(f"{where}: unknown config key {prefix + str(key)!r}; known keys here: {sorted(known)}")
    values = {key: _coerce(hints[key], value, where, prefix + key) for key, value in mapping.items()}
    for key, value in values.items():
        _check_value(key, value, where, prefix + key)
    return cls(**values)


def _positive(value: Any) -> str:
    return "" if value is None or value > 0 else "must be > 0"


def _at_least_one(value: Any) -> str:
    return "" if value is None or value >= 1 else "must be at least 1"


def _non_negative(value: Any) -> str:
    return "" if value is None or value >= 0 else "must be >= 0"


def _device(value: str) -> str:
    return "" if re.fullmatch(r"cpu|cuda(:\d+)?|mps", value) else "must be cpu, cuda or cuda:N"


def _backbone(value: str) -> str:
    return "" if value in ("hipnn", "mace") else "must be hipnn or mace"


def _level_embedding_place(value: str) -> str:
    return "" if value in LEVEL_EMBEDDING_PLACES else f"must be one of {list(LEVEL_EMBEDDING_PLACES)}"


def _new_elements(value: str) -> str:
    return "" if value in NEW_ELEMENT_MODES else f"must be one of {list(NEW_ELEMENT_MODES)}"


VALUE_RULES: dict[str, Callable[[Any], str]] = {
    # a key of this name in any section: empty string if the value is fine, else what is wrong
    "batch_size": _positive,
    "learning_rate": _positive,
    "threads": _positive,
    "n_features": _positive,
    "n_sensitivities": _positive,
    "n_interaction_layers": _positive,
    "n_atom_layers": _positive,
    "soft_min_angstrom": _positive,
    "soft_max_angstrom": _positive,
    "cutoff_angstrom": _positive,
    "backbone": _backbone,
    "num_channels": _positive,
    "max_L": _non_negative,
    "max_ell": _non_negative,
    "correlation": _positive,
    "num_interactions": _positive,
    "num_bessel": _positive,
    "num_polynomial_cutoff": _positive,
    "radial_MLP": _positive,
    "avg_num_neighbors": _positive,
    "level_embedding_into": _level_embedding_place,
    "max_epochs": _at_least_one,
    "max_wall_seconds": _positive,
    "gradient_steps": _at_least_one,
    "steps_per_epoch": _at_least_one,
    "wall_seconds": _positive,
    "n_finetune": _at_least_one,
    "device": _device,
    "new_elements": _new_elements,
}


def _check_value(name: str, value: Any, where: str, key: str) -> None:
    """InputError naming `key` when a rule of `VALUE_RULES` rejects `value`."""
    rule = VALUE_RULES.get(name)
    if rule is None:
        return
    for item in value if isinstance(value, list) else [value]:
        problem = rule(item)
        if problem:
            raise InputError(f"{where}: config key {key!r} {problem}, got {value!r}")


def _coerce(hint: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    arguments = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        hint = next(argument for argument in arguments if argument is not type(None))
        return _coerce(hint, value, where, key)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where, key + ".")
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: config key {key!r} must be a mapping, got {value!r}")
        return {str(name): _coerce(arguments[1], item, where, f"{key}.{name}") for name, item in value.items()}
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(arguments[0], item, where, f"{key}[{index}]") for index, item in enumerate(items)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if hint is Any:
        return value
    raise InputError(f"{where}: config key {key!r} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def resolve_paths(config: Any, base_dir: Path, prefix: str = "") -> None:
    """Make file paths (`path` of data and scan sources, `checkpoint`, `selection_file`) absolute,
    relative to the config file's folder, and check that they exist; a `checkpoint` that is no
    file may name a shipped pre-trained model (`metamlip.pretrained`), whose file it becomes."""
    for name in (f.name for f in dataclasses.fields(config)):
        value = getattr(config, name)
        if name in ("path", "checkpoint", "selection_file") and isinstance(value, str):
            if not value:
                raise InputError(f"config key {prefix + name!r} is missing")
            path = Path(value).expanduser()
            resolved = path if path.is_absolute() else (base_dir / path).resolve()
            if name == "checkpoint":
                resolved = checkpoint_or_shipped(value, resolved, prefix + name)
            elif not resolved.exists():
                raise InputError(f"config key {prefix + name!r}: {resolved}: no such file")
            setattr(config, name, str(resolved))
            continue
        items = value if isinstance(value, list) else [value]
        for index, item in enumerate(items):
            if dataclasses.is_dataclass(item):
                where = f"{prefix}{name}[{index}]." if isinstance(value, list) else f"{prefix}{name}."
                resolve_paths(item, base_dir, where)


def default_mapping(cls: type) -> dict[str, Any]:
    """Every key of config class `cls` with its default; a list of sections shows one default item."""
    hints = typing.get_type_hints(cls)
    mapping = {}
    for item in dataclasses.fields(cls):
        value = getattr(cls(), item.name)
        arguments = typing.get_args(hints[item.name])
        if dataclasses.is_dataclass(value):
            value = default_mapping(type(value))
        elif typing.get_origin(hints[item.name]) is list and arguments and dataclasses.is_dataclass(arguments[0]):
            value = [default_mapping(arguments[0])]
        mapping[item.name] = value
    return mapping


def defaults_yaml(cls: type) -> str:
    """`default_mapping(cls)` as YAML, keys in the order of the dataclass fields."""
    return yaml.safe_dump(default_mapping(cls), sort_keys=False, default_flow_style=False)
