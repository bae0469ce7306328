"""The train pipeline step."""
