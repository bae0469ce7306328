"""The search space and the sweep's settings, and the checks that refuse a sweep before any trial.

A search space maps run-config fields (dotted paths, as `--set` writes them) to Ray Tune domains,
written `choice(4, 8, 16)`, `grid(1e-4, 3e-4, 1e-3)`, `uniform(0, 0.2)`, `loguniform(1e-5, 1e-3)`
or `randint(1, 4)` (the upper bound excluded, as in Ray Tune). Values are read as YAML, so
`choice(lora, ia3)` gives strings and `choice([query, value], all-linear)` a list and a string.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from kftune.config import RunConfig, config_to_dict, parse_config, with_values
from kftune.errors import KftuneError
from kftune.sweep.config import SweepSettings

DOMAIN = re.compile(r"^\s*(choice|grid|uniform|loguniform|randint)\s*\((.*)\)\s*$", re.DOTALL)
INTERIOR = 0.381966
"""Where inside a range one more point is checked: not a round number, so a float range on an integer field shows."""
MAX_CHECKED_POINTS = 1024


class _Values(yaml.SafeLoader):
    """YAML with 1e-5 read as a number, as YAML 1.2 reads it (PyYAML's 1.1 rules want 1.0e-5)."""


_Values.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


@dataclass(frozen=True)
class Domain:
    """One field's search domain: `kind` (choice, grid, uniform, loguniform, randint) and its arguments."""

    kind: str
    args: tuple

    @classmethod
    def parse(cls, field: str, text: str) -> Domain:
        match = DOMAIN.match(text)
        if not match:
            raise KftuneError(
                f"{field}: {text!r} is not a search domain; write choice(a, b), grid(a, b), uniform(lo, hi), "
                "loguniform(lo, hi) or randint(lo, hi)"
            )
        kind, inner = match.groups()
        try:
            args = yaml.load(f"[{inner}]", Loader=_Values)  # a SafeLoader
        except yaml.YAMLError:
            raise KftuneError(f"{field}: cannot read the values of {text!r} (YAML, comma-separated)") from None
        if kind in ("choice", "grid"):
            if not args:
                raise KftuneError(f"{field}: {kind}() needs at least one value")
            return cls(kind, tuple(args))
        numbers = len(args) == 2 and all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
        if not numbers or not args[0] < args[1]:
            raise KftuneError(f"{field}: {kind}(lo, hi) takes two numbers with lo < hi, not {text!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise KftuneError(f"{field}: loguniform(lo, hi) needs lo > 0, not {args[0]}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise KftuneError(f"{field}: randint(lo, hi) takes integers, not {text!r}")
        return cls(kind, tuple(args))

    def checked_values(self) -> list[Any]:
        """Values that stand for the whole domain when checking configs: every listed value; a range's
        bounds and one interior point (randint: its lowest and highest integer)."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args
        if self.kind == "randint":
            return [low, high - 1]
        if self.kind == "loguniform":
            return [low, high, low * (high / low) ** INTERIOR]
        return [low, high, low + (high - low) * INTERIOR]

    def to_tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(map(str, self.args))})"


PROMPT_SHAPING = ("model", "data", "prompt")
"""The sections prepare_data and build_prompts read (and train.seed, for the split and the demonstrations)."""


def pipeline_problems(settings: SweepSettings) -> list[str]:
    """A run config's sweep runs in the pipeline's train step, after build_prompts and before evaluate, which
    both work from the run's own config: its trials may differ in how they train, not in what they train on."""
    return [
        f"space: {field} shapes the data and prompts, which the pipeline builds once before the train step;"
        " search it with `kftune sweep`, then `kftune run` its best.yaml"
        for field in settings.space
        if field.split(".")[0] in PROMPT_SHAPING or field == "train.seed"
    ]


def trial_base(config: RunConfig) -> dict[str, Any]:
    """A config's trials before their values are written in: the config without its sweep section, under a
    RayJob as each trial trains on its cluster (its share of the workers, `kftune.kube.rayjob.sized_for_rayjob`)."""
    data = {key: value for key, value in config_to_dict(config).items() if key != "sweep"}
    rayjob = config.cluster.rayjob
    if not rayjob.enabled:
        return data
    trials = config.sweep.parallel if config.sweep else 1
    return with_values(
        data,
        {
            "train.workers": rayjob.ray_workers(trials),
            "train.use_gpu": rayjob.worker.gpus > 0,
            "cluster.rayjob.enabled": False,
        },
    )


def is_domain(text: str) -> bool:
    """Whether a `--set` value is a search domain rather than a plain value."""
    return bool(DOMAIN.match(text))


def load_sweep_settings(
    path: str | None, space: dict[str, str], flags: dict[str, Any], config_section: SweepSettings | None = None
) -> SweepSettings:
    """The run config's sweep section (optional), with the sweep file's keys (optional) over it, `--set` domains
    added to its space and the flags that were given on top."""
    from pathlib import Path

    data: dict[str, Any] = config_section.model_dump(exclude_none=True) if config_section else {}
    source = path or "the command line"
    if path:
        if not Path(path).is_file():
            raise KftuneError(f"sweep file not found: {path}")
        try:
            from_file = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise KftuneError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(from_file, dict):
            raise KftuneError(f"{path}: the top level must be a mapping (space, metric, samples, parallel, ...)")
        data = {**data, **from_file, "space": {**data.get("space", {}), **(from_file.get("space") or {})}}
    data["space"] = {**(data.get("space") or {}), **space}
    data.update({key: value for key, value in flags.items() if value is not None})
    try:
        return SweepSettings.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise KftuneError(f"invalid sweep settings ({source}):\n  " + "\n  ".join(problems)) from None


def samples_per_point(domains: dict[str, Domain], samples: int | None) -> int:
    """Ray Tune's num_samples: each grid point is drawn this many times."""
    return samples or (1 if all(d.kind == "grid" for d in domains.values()) else 4)


def trial_count(domains: dict[str, Domain], samples: int | None) -> int:
    grid = math.prod(len(d.args) for d in domains.values() if d.kind == "grid")
    return grid * samples_per_point(domains, samples)


def check_sweep(
    base: dict[str, Any], settings: SweepSettings, resources: dict[str, float] | None
) -> tuple[dict[str, Domain], list[RunConfig]]:
    """The parsed domains and the checked configs, or one KftuneError listing every problem (`sweep_problems`)."""
    problems, domains, configs = _checked_sweep(base, settings, resources)
    if problems:
        raise KftuneError("invalid sweep:\n  " + "\n  ".join(problems))
    return domains, configs


def sweep_problems(
    base: dict[str, Any], settings: SweepSettings, resources: dict[str, float] | None = None
) -> list[str]:
    """Every problem of a sweep over the run config `base` (a dict without a sweep section): a field that does not
    exist or a value of the wrong type (every configuration the space can sample is validated through its
    representative values), a metric the runs do not report, and with `resources` (Ray's CPU and GPU counts) more
    parallel trials than they hold."""
    return _checked_sweep(base, settings, resources)[0]


def _checked_sweep(base, settings: SweepSettings, resources) -> tuple[list[str], dict[str, Domain], list[RunConfig]]:
    problems: list[str] = []
    domains: dict[str, Domain] = {}
    if not settings.space:
        problems.append("space: empty; give fields to search with --set field=choice(...) or a sweep file's space")
    for field, text in settings.space.items():
        try:
            domains[field] = Domain.parse(field, str(text))
        except KftuneError as exc:
            problems.append(str(exc))
    configs = _checked_configs(base, domains, problems) if domains and not problems else []
    for config in configs:
        for problem in _metric_problems(config, settings.metric):
            if problem not in problems:
                problems.append(problem)
    if configs and resources is not None:
        problems += _resource_problems(
            configs, min(settings.parallel, trial_count(domains, settings.samples)), resources
        )
    return problems, domains, configs


def _checked_configs(base: dict[str, Any], domains: dict[str, Domain], problems: list[str]) -> list[RunConfig]:
    """Every combination of the domains' checked values (or, past MAX_CHECKED_POINTS, each field's values
    with the others at their first), validated as run configs; their problems named by the point."""
    fields = list(domains)
    values = [domains[f].checked_values() for f in fields]
    if math.prod(map(len, values)) <= MAX_CHECKED_POINTS:
        points = [dict(zip(fields, combination, strict=True)) for combination in itertools.product(*values)]
    else:
        firsts = {f: v[0] for f, v in zip(fields, values, strict=True)}
        points = [{**firsts, f: value} for f, vs in zip(fields, values, strict=True) for value in vs]
    configs, seen = [], set()
    for point in points:
        where = ", ".join(f"{field}={value!r}" for field, value in point.items())
        try:
            configs.append(parse_config(with_values(base, point), source=where))
        except KftuneError as exc:
            for line in str(exc).splitlines()[1:]:
                body = line.strip().split(": ", 1)[-1]
                if body not in seen:
                    seen.add(body)
                    problems.append(f"at {line.strip()}")
    return configs


def _metric_problems(config: RunConfig, metric: str) -> list[str]:
    problems = []
    if not config.train.eval_every_steps:
        problems.append(
            f"metric: {metric} is not reported during training: set train.eval_every_steps (and data.split.validation)"
        )
    if metric == "validation_accuracy" and config.model.task != "sequence_classification":
        problems.append(
            f"metric: validation_accuracy is reported by classification heads (model.task: sequence_classification),"
            f" not {config.model.task}; use validation_loss"
        )
    return problems


def _resource_problems(configs: list[RunConfig], parallel: int, resources: dict[str, float]) -> list[str]:
    """Parallel trials must fit at once (one trial alone may share the cores, as `kftune run` does)."""
    problems = []
    cpus = max(c.train.workers * c.train.cpus_per_worker for c in configs)
    gpus = max(c.train.workers if c.train.use_gpu else 0 for c in configs)
    have_cpus, have_gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if parallel > 1 and parallel * cpus > have_cpus:
        problems.append(
            f"parallel: {parallel} trials at once need {parallel * cpus:g} CPUs ({cpus:g} each: train.workers x"
            f" train.cpus_per_worker); Ray has {have_cpus:g}, enough for {int(have_cpus // cpus)} at once"
        )
    if gpus and parallel * gpus > have_gpus:
        problems.append(
            f"parallel: {parallel} trial(s) at once need {parallel * gpus} GPUs ({gpus} each: train.workers with"
            f" train.use_gpu); Ray has {have_gpus:g}, enough for {int(have_gpus // gpus)} at once"
        )
    return problems
