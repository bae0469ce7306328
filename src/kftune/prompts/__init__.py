"""Prompt construction: templates (data files) and tokenization with loss masking."""
