"""The evaluate pipeline step."""
