"""Preference alignment: the training objective a run's `stage` selects (SFT, a reward model, or a
loss of the DPO family), the preference data forms it reads, and how its models are evaluated."""
