"""The fingerprint_data pipeline step."""
