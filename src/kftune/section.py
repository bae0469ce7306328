"""The base of every config section, shared by the run config and its cluster settings."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, not silently ignored typos."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
