"""The resolve_config pipeline step."""
