"""The prepare_data pipeline step."""
