"""The policy side: model loading, generation backends and multi-turn rollouts."""
