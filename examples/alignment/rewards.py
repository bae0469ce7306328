"""Reward functions for the GRPO example (`online.reward_function: rewards.py:cheerful`).

A function takes the prompts (rendered text) and the sampled completions and returns one float per
completion. This one is a toy: it rewards cheerful story words and penalises rambling, which a
260K-parameter story model can learn in a few minutes on two cores.
"""

CHEERFUL = {"happy", "smiled", "smile", "fun", "laughed", "love", "loved", "friends", "played", "glad"}


def cheerful(prompts: list[str], completions: list[str]) -> list[float]:
    rewards = []
    for completion in completions:
        words = [word.strip(".,!?\"'").lower() for word in completion.split()]
        rewards.append(sum(word in CHEERFUL for word in words) - 0.02 * len(words))
    return rewards
