"""PPO and GRPO training: config, the loss math, the learner update, the loop, checkpoints and logs."""
