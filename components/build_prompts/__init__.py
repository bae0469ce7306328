"""The build_prompts pipeline step."""
