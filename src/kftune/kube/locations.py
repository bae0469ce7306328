"""What a step pod can read. A run config compiled for a cluster must name its data, model and template
where every pod sees them: under the volume every step mounts (`cluster.volume`), behind a URI
(`s3://...`), or as a packaged alias; the general text, a Fisher file and a reward function are read from
a path, so they must be on the volume. A path on the submitting machine would be re-validated and read
inside pods where it does not exist. Checked by `kftune compile/submit/schedule`; `kftune run` reads them here."""

from __future__ import annotations

from pathlib import PurePosixPath

from kftune.config import RunConfig
from kftune.errors import KftuneError
from kftune.models import PACKAGED_MODELS
from kftune.prompts.templates import PACKAGED as PACKAGED_TEMPLATES


def local_only_locations(config: RunConfig) -> list[str]:
    """One message per field that names a path only this machine has, with the options that would work."""
    volume = config.cluster.volume
    fields = [("data.path", config.data.path)]
    if isinstance(config.data.split.test, str):
        fields.append(("data.split.test", config.data.split.test))
    if config.model.name_or_path not in PACKAGED_MODELS:
        fields.append(("model.name_or_path", config.model.name_or_path))
    if isinstance(config.prompt.template, str) and config.prompt.template not in PACKAGED_TEMPLATES:
        fields.append(("prompt.template", config.prompt.template))
    volume_only = [  # files read where a step runs, from a path (no URI reader)
        ("eval.general_text", config.eval.general_text),
        ("retention.general_data", config.retention.general_data),
        ("retention.ewc.fisher_file", config.retention.ewc and config.retention.ewc.fisher_file),
        ("online.reward_function", (config.online.reward_function or "").rpartition(":")[0]),
        ("sweep.storage", config.sweep and config.sweep.storage),  # the sweep's folder, written by every Ray node
    ]
    fields += [(field, value) for field, value in volume_only if value]
    on_volume = (
        f"a path under cluster.volume.mount_path ({volume.mount_path})"
        if volume
        else "a path on a volume (set cluster.volume: a PVC every step mounts)"
    )
    aliases = {
        "model.name_or_path": f"a packaged model ({', '.join(sorted(PACKAGED_MODELS))})",
        "prompt.template": f"a packaged template ({', '.join(PACKAGED_TEMPLATES)})",
    }
    problems = []
    paths_only = {field for field, _ in volume_only}
    for field, value in fields:
        if volume and PurePosixPath(value).is_relative_to(volume.mount_path):
            continue
        if "://" in value and field not in paths_only:
            continue
        options = (
            [on_volume]
            + ([] if field in paths_only else ["an s3:// URI"])
            + ([aliases[field]] if field in aliases else [])
        )
        where = (
            "is a URI; this file is read from a path"
            if "://" in value
            else "is on this machine, not where the pipeline's pods run"
        )
        problems.append(f"{field}: {value} {where}; use {', or '.join(options)}")
    return problems


def check_pods_can_read(config: RunConfig) -> None:
    """Raise with every field at once when the config names files only this machine has."""
    problems = local_only_locations(config)
    if problems:
        raise KftuneError("the config names files the cluster's pods cannot read:\n  " + "\n  ".join(problems))
