"""Scaling a training run out with Ray: rollout workers, retrieval replicas and data-parallel learners.

Only the modules that start or call actors (``cluster``, ``groups``, ``launch``) import ray, and only
``searchgym train ... ray.enabled=true`` imports them; ``config``, ``placement`` and ``actors`` are plain
Python and torch, so the single-process trainer never needs ray installed.
"""
