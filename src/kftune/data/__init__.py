"""Data preparation: reading files, cleaning, splitting, data cards."""
