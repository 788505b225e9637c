"""Evaluation: EM / F1 tables on the QA benchmarks for a checkpoint and its baselines.

The parser and the reward functions are the training ones (``searchgym.env.actions``,
``searchgym.env.rewards``), so a number
printed here means the same thing as the reward the trainer optimised. Nothing heavy is imported here.
"""
