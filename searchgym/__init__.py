"""searchgym: train language models to search and reason with reinforcement learning."""

__version__ = "0.1.0"
