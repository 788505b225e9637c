"""``searchgym train``: load the data, start the policy (warm-started when configured), then train.

In one process the loop drives a :class:`~searchgym.train.learner.LocalLearner` and a
:class:`~searchgym.train.search_rollout.SearchRollout`; with ``ray.enabled`` it drives the Ray learners and
rollout workers (:mod:`searchgym.train.distributed.launch`). Either way it is the same loop.
"""

import dataclasses
from collections.abc import Callable, Sequence

from searchgym.env import QAExample, SearchVectorEnv, load_dataset
from searchgym.policy.models import Policy
from searchgym.policy.vllm_backend import VLLMAsyncEngine
from searchgym.runtime import seed_everything, set_torch_threads
from searchgym.train.build import (
    load_training_policy,
    make_engine,
    open_retriever,
    vector_envs,
)
from searchgym.train.config import TrainConfig
from searchgym.train.learner import single_process_learner
from searchgym.train.loop import TrainResult, evaluate, train
from searchgym.train.search_rollout import SearchRollout
from searchgym.train.warmstart import WARMSTART_DIR, warm_started_policy


def run_training(config: TrainConfig) -> TrainResult:
    """The whole job of ``searchgym train``, in this process or on a Ray cluster."""
    train_examples = load_dataset(config.data.train, limit=config.data.train_limit)
    dev_examples = load_dataset(config.data.dev, limit=config.data.dev_limit)
    if config.ray.enabled:
        from searchgym.train.distributed.launch import train_on_ray  # ray loads here only

        if config.warmstart.examples > 0:
            # The warm-start runs here, as in one process; every actor then loads the policy it leaves.
            starting_policy(config, train_examples, dev_examples)
            warm_started = dataclasses.replace(config.model, path=str(config.run_dir / WARMSTART_DIR))
            config = dataclasses.replace(config, model=warm_started)
        return train_on_ray(config, train_examples=train_examples, dev_examples=dev_examples)
    policy, make_env = starting_policy(config, train_examples, dev_examples)
    learner = single_process_learner(config, policy)
    engine = make_engine(config)
    rollout = SearchRollout(
        policy=policy,
        make_env=make_env,
        budgets=config.token_budgets,
        engine=engine,
        mode=config.rollout.mode,
        search_wait_s=config.rollout.search_wait_s,
        overlap=config.rollout.max_staleness > 0,
    )
    try:
        return train(
            config,
            learner=learner,
            rollout=rollout,
            tokenizer=policy.tokenizer,
            train_examples=train_examples,
            dev_examples=dev_examples,
        )
    finally:
        # The async engine's core process and event-loop thread outlive the run otherwise (vllm.LLM
        # shuts its engine down when collected).
        if isinstance(engine, VLLMAsyncEngine):
            engine.close()


def starting_policy(
    config: TrainConfig, train_examples: Sequence[QAExample], dev_examples: Sequence[QAExample]
) -> tuple[Policy, Callable[[int], SearchVectorEnv]]:
    """What every search run starts from: the policy (warm-started when configured) and its vector envs.

    Sets the torch threads and the seed first.
    """
    set_torch_threads(config.system.torch_threads)
    seed_everything(config.system.seed)
    policy = load_training_policy(config)
    make_env = vector_envs(config, open_retriever(config.retriever), policy.tokenizer)
    if config.warmstart.examples > 0:
        budgets = config.token_budgets

        def dev_eval() -> dict[str, float]:
            rollout = SearchRollout(policy=policy, make_env=make_env, budgets=budgets)
            return evaluate(rollout, dev_examples, config, step=0)

        policy = warm_started_policy(
            config,
            policy,
            make_env=make_env,
            budgets=budgets,
            train_examples=train_examples,
            dev_eval=dev_eval if dev_examples and config.dev.before_training else None,
        )
    return policy, make_env
