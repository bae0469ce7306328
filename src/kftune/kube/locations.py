"""What a step pod can read. A run config compiled for a cluster must name its data, model and template
where every pod sees them: under the volume every step mounts (`cluster.volume`), behind a URI
(`s3://...`), or as a packaged alias. A path on the submitting machine would be re-validated and read
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
    for field, value in fields:
        if "://" in value or (volume and PurePosixPath(value).is_relative_to(volume.mount_path)):
            continue
        options = [on_volume, "an s3:// URI"] + ([aliases[field]] if field in aliases else [])
        problems.append(
            f"{field}: {value} is on this machine, not where the pipeline's pods run; use {', or '.join(options)}"
        )
    return problems


def check_pods_can_read(config: RunConfig) -> None:
    """Raise with every field at once when the config names files only this machine has."""
    problems = local_only_locations(config)
    if problems:
        raise KftuneError("the config names files the cluster's pods cannot read:\n  " + "\n  ".join(problems))
