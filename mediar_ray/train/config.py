"""Training configs: dataclasses, loaded from YAML/JSON and validated on load.

Every section is a dataclass; unknown keys at any level and values of the wrong type or
out of range raise :class:`ConfigError`, naming the file, the key path
(``augment.noise_p``) and what is allowed. ``configs/`` holds MEDIAR's phases and the small
CPU model; see ``configs/README.md`` for what each is.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import fsspec

from mediar_ray.errors import UserError

__all__ = ["ConfigError", "TrainConfig", "load_config", "read_config_data"]


class ConfigError(UserError):
    """A config file has an unknown key or a bad value."""


class _Section:
    """Conversion of a dataclass section from/to plain dicts, with validation."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", path: str = "") -> Any:
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: {path or 'the config'} must be a mapping, got {type(data).__name__}"
            )
        hints = get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            where = path.rstrip(".") or "top level"
            raise ConfigError(f"{source}: unknown key(s) {unknown} at {where}; allowed: {names}")
        values = {}
        for name in names:
            if name not in data:
                continue
            kind, value, key = hints[name], data[name], f"{path}{name}"
            if isinstance(kind, type) and issubclass(kind, _Section):
                values[name] = kind.from_dict(value or {}, source, key + ".")
            else:
                values[name] = _check_type(value, kind, source, key)
        obj = cls(**values)
        # The keys the file set itself (not dataclass defaults): model.init fills the
        # others from the checkpoint (train.preflight.resolve_model_init).
        obj._given = frozenset(data)
        for key, ok, allowed in obj._rules():
            if not ok:
                raise ConfigError(
                    f"{source}: {path}{key} = {getattr(obj, key)!r} is not allowed: {allowed}"
                )
        return obj

    def _rules(self) -> list[tuple[str, bool, str]]:
        return []


def _check_type(value: Any, kind: Any, source: str, key: str) -> Any:
    """``value`` if it fits the annotation ``kind`` (ints accepted for floats)."""
    text = str(kind)
    optional = "None" in text
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key} may not be empty")
    checks = [
        ("bool", lambda v: isinstance(v, bool)),
        ("int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
        ("float", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
        ("str", lambda v: isinstance(v, str)),
        ("list", lambda v: isinstance(v, list)),
        ("dict", lambda v: isinstance(v, dict)),
    ]
    for name, ok in checks:
        if (
            text.startswith(name)
            or text.startswith(f"typing.Optional[{name}")
            or text.startswith(f"{name} |")
            or text == f"<class '{name}'>"
        ):
            if not ok(value):
                raise ConfigError(f"{source}: {key} must be {name}, got {value!r}")
            return float(value) if name == "float" else value
    return value


def _prob(v: float) -> bool:
    return 0.0 <= v <= 1.0


@dataclass
class DataSection(_Section):
    roots: list = field(default_factory=list)
    mappings: list = field(default_factory=list)
    holdout_every: int = 5
    public_roots: list = field(default_factory=list)
    public_mappings: list = field(default_factory=list)
    replay_per_batch: int = 0
    modality_table: str | None = None
    # True: refuse to start when any pair is bad; False: list the bad pairs, train on
    # the good ones (data.mapping.check_pairs).
    strict: bool = False

    def _rules(self):
        return [
            (
                "holdout_every",
                self.holdout_every >= 0 and self.holdout_every != 1,
                "0 (no held-out split) or >= 2",
            ),
            ("replay_per_batch", self.replay_per_batch >= 0, ">= 0"),
        ]


@dataclass
class ModelSection(_Section):
    encoder_name: str = "mit_b5"
    decoder_channels: list = field(default_factory=lambda: [1024, 512, 256, 128, 64])
    decoder_pab_channels: int = 256
    init: str | None = None

    def _rules(self):
        return [
            (
                "decoder_channels",
                len(self.decoder_channels) == 5
                and all(isinstance(c, int) and c > 0 for c in self.decoder_channels),
                "five positive integers",
            ),
            ("decoder_pab_channels", self.decoder_pab_channels > 0, "> 0"),
        ]


@dataclass
class AugmentSection(_Section):
    crop: int = 512
    zoom_p: float = 0.5
    zoom_range: list = field(default_factory=lambda: [0.25, 1.5])
    flip_p: float = 0.5
    rotate_p: float = 0.5
    cell_aware_p: float = 0.25
    cell_aware_fraction: float = 0.4
    cell_aware_range: list = field(default_factory=lambda: [1.0, 1.7])
    noise_p: float = 0.25
    contrast_p: float = 0.25
    smooth_p: float = 0.25
    hist_shift_p: float = 0.25
    sharpen_p: float = 0.25
    boundary_exclusion: bool = False
    # H&E stain jitter of colour images (data.transforms.stain_jitter); not MEDIAR's,
    # off by default.
    stain_p: float = 0.0
    stain_scale: float = 0.05
    stain_shift: float = 0.05
    # Loss weights of small and touching cells (data.transforms.pixel_weights); the
    # defaults turn both off, which is MEDIAR's loss.
    small_cell_area: int = 0
    small_cell_max_weight: float = 3.0
    touching_weight: float = 1.0

    def _rules(self):
        probs = [
            (k, _prob(getattr(self, k)), "a probability in [0, 1]")
            for k in (
                "zoom_p",
                "flip_p",
                "rotate_p",
                "cell_aware_p",
                "cell_aware_fraction",
                "noise_p",
                "contrast_p",
                "smooth_p",
                "hist_shift_p",
                "sharpen_p",
                "stain_p",
            )
        ]
        return probs + [
            ("stain_scale", 0 <= self.stain_scale < 1, "in [0, 1)"),
            ("stain_shift", self.stain_shift >= 0, ">= 0"),
            ("small_cell_area", self.small_cell_area >= 0, ">= 0 pixels (0: off)"),
            ("small_cell_max_weight", self.small_cell_max_weight >= 1, ">= 1"),
            ("touching_weight", self.touching_weight > 0, "> 0 (1: off)"),
            ("crop", self.crop >= 32 and self.crop % 32 == 0, "a multiple of 32, >= 32"),
            ("zoom_range", _pair(self.zoom_range, 0.0), "[low, high] with 0 < low <= high"),
            (
                "cell_aware_range",
                _pair(self.cell_aware_range, 0.0),
                "[low, high] with 0 < low <= high",
            ),
        ]


def _pair(v: list, floor: float) -> bool:
    return len(v) == 2 and all(isinstance(x, (int, float)) for x in v) and floor < v[0] <= v[1]


@dataclass
class SamplingSection(_Section):
    amplified: bool = True
    min_per_cluster: int = 50
    cluster_min: dict = field(default_factory=dict)  # {cluster id: its own m}

    def __post_init__(self):
        # JSON (a saved config, Ray's copy to workers) turns integer keys into strings.
        if all(_int_like(k) for k in self.cluster_min):
            self.cluster_min = {int(k): v for k, v in self.cluster_min.items()}

    def _rules(self):
        good = all(
            isinstance(k, int)
            and k >= 0
            and isinstance(v, int)
            and not isinstance(v, bool)
            and v >= 1
            for k, v in self.cluster_min.items()
        )
        return [
            ("min_per_cluster", self.min_per_cluster >= 1, ">= 1"),
            ("cluster_min", good, "a mapping of cluster id (int >= 0) to an int >= 1"),
        ]


def _int_like(k: Any) -> bool:
    return (isinstance(k, int) and not isinstance(k, bool)) or (isinstance(k, str) and k.isdigit())


@dataclass
class OptimSection(_Section):
    lr: float = 5e-5
    weight_decay: float = 0.01
    epochs: int = 200
    batch_size: int = 8
    flow_weight: float = 0.5
    warmup_epochs: int = 0
    amp: bool = False  # bfloat16 autocast of the forward pass (loss in float32)

    def _rules(self):
        return [
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("flow_weight", self.flow_weight >= 0, ">= 0"),
            ("warmup_epochs", 0 <= self.warmup_epochs < self.epochs, "0 <= warmup < epochs"),
        ]


@dataclass
class RunSection(_Section):
    storage_path: str = "./runs"
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    loader_workers: int = 1
    loader_cpus: float = 1.0
    max_failures: int = 3
    checkpoint_every: int = 1
    keep_checkpoints: int = 3
    validate_every: int = 5
    validate_max_images: int = 0
    validate_roi: int = 512
    max_steps_per_epoch: int = 0
    # On a cluster with an autoscaler: seconds to wait for the nodes the workers need
    # before giving up (a fixed cluster that cannot give them is refused at once).
    resource_timeout: float = 600.0

    def _rules(self):
        return [
            ("num_workers", self.num_workers >= 1, ">= 1"),
            ("cpus_per_worker", self.cpus_per_worker > 0, "> 0"),
            ("loader_workers", self.loader_workers >= 1, ">= 1"),
            ("loader_cpus", self.loader_cpus >= 0, ">= 0"),
            ("max_failures", self.max_failures >= -1, ">= 0, or -1 for no limit"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"),
            ("validate_every", self.validate_every >= 0, ">= 0 (0 = never)"),
            ("validate_max_images", self.validate_max_images >= 0, ">= 0 (0 = all)"),
            (
                "validate_roi",
                self.validate_roi % 32 == 0 and self.validate_roi > 0,
                "a positive multiple of 32",
            ),
            ("max_steps_per_epoch", self.max_steps_per_epoch >= 0, ">= 0 (0 = no limit)"),
            ("resource_timeout", self.resource_timeout >= 0, ">= 0 seconds"),
        ]


@dataclass
class TrainConfig(_Section):
    """A training run: data, model, augmentations, sampling, optimiser, Ray settings."""

    name: str = ""
    seed: int = 0
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def _rules(self):
        import re

        return [
            (
                "name",
                bool(re.fullmatch(r"[A-Za-z0-9._-]+", self.name)),
                "a non-empty run name of letters, digits, '.', '_' or '-'",
            )
        ]


def _yaml12_loader() -> Any:
    """A safe YAML loader that reads numbers as YAML 1.2 does.

    PyYAML implements YAML 1.1, whose float pattern needs a dot and a signed exponent:
    ``1e-3`` and ``5e5`` are read as text there. YAML 1.2's core schema reads them as
    floats, as every other YAML 1.2 and JSON reader does.
    """
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"
            r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
        ),
        list("-+0123456789."),
    )
    return Loader


def read_config_data(path_or_url: str) -> dict[str, Any]:
    """The plain mapping of a YAML or JSON config file (any fsspec URL), unvalidated."""
    import yaml

    try:
        with fsspec.open(path_or_url, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path_or_url} not found") from None
    try:
        data = (
            json.loads(text)
            if str(path_or_url).endswith(".json")
            else yaml.load(text, Loader=_yaml12_loader())
        )
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path_or_url}: not valid YAML/JSON ({err})") from None
    return data or {}


def load_config(path_or_url: str) -> TrainConfig:
    """Read a YAML or JSON training config (any fsspec URL) and validate it."""
    return TrainConfig.from_dict(read_config_data(path_or_url), source=str(path_or_url))
