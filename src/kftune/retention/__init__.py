"""Knowledge retention: fine-tuning without forgetting what the base model knew.

- `config`: the run config's `retention` section and where it cannot apply.
- `general`: the general data that stands for the base's knowledge (a file, or the packaged text).
- `anchor`: L2-SP and EWC, penalties toward the pretrained weights.
- `fisher`: EWC's diagonal Fisher of the base, cached by content hash.
- `distill`: knowledge distillation from the base (the adapter disabled, or a frozen copy).
- `terms`: the extra loss terms one training micro-batch adds, the training loop's one entry point.
"""
