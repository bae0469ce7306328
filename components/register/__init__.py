"""The register pipeline step."""
