"""The search environment: datasets, prompts, action parsing, observations, rewards and the Gymnasium envs.

Importing this package registers ``searchgym/SearchQA-v0`` with Gymnasium (by module path, so nothing
heavy is imported until an env is made)::

    import gymnasium
    import searchgym.env

    search_env = gymnasium.make("searchgym/SearchQA-v0", dataset="wiki-mini-dev", retriever=retriever)
    vector_env = gymnasium.make_vec("searchgym/SearchQA-v0", num_envs=64, dataset=..., retriever=...)
"""

import gymnasium

from searchgym.env.actions import Answer, Invalid, InvalidReason, Search, parse_action
from searchgym.env.config import EnvConfig, EnvConfigError
from searchgym.env.data import QAExample, dataset_names, load_dataset
from searchgym.env.search_env import SearchEnv
from searchgym.env.vector import SearchVectorEnv

ENV_ID = "searchgym/SearchQA-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(
        id=ENV_ID,
        entry_point="searchgym.env.search_env:SearchEnv",
        vector_entry_point="searchgym.env.vector:SearchVectorEnv",
    )

__all__ = [
    "ENV_ID",
    "Answer",
    "EnvConfig",
    "EnvConfigError",
    "Invalid",
    "InvalidReason",
    "QAExample",
    "Search",
    "SearchEnv",
    "SearchVectorEnv",
    "dataset_names",
    "load_dataset",
    "parse_action",
]
