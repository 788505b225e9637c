"""SearchVectorEnv: N search episodes stepped together, with one retriever call per step."""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from searchgym.env.config import EnvConfig
from searchgym.env.search_env import DatasetLike, EpisodeStateError, SearchEnv, resolve_examples
from searchgym.env.tokens import Tokenizer
from searchgym.env.tools import ToolRequest, call_batched
from searchgym.errors import SearchgymError
from searchgym.retriever.base import Retriever

StepOutput = tuple[str, float, bool, bool, dict[str, Any] | None]
_RESET_OPTIONS = frozenset({"examples", "reset_mask"})


class SearchVectorEnv(VectorEnv):
    """``num_envs`` :class:`~searchgym.env.SearchEnv` episodes in lockstep (Gymnasium's VectorEnv API).

    Every step sends the searches of all sub-envs to the retriever in ONE ``search`` call (none when no
    sub-env searches); each search's ``retrieval_latency_s`` is that call's wall time.

    Observations are a tuple of strings and actions a sequence of strings, one per sub-env; rewards,
    terminations and truncations are ``(num_envs,)`` arrays. Infos are Gymnasium's dict of arrays: each
    key holds a ``(num_envs,)`` array and ``info["_key"]`` marks the sub-envs that set it (an array of
    objects when some value is None, a string or a tuple). :attr:`final_infos` keeps the last info of
    each sub-env's latest finished episode, which is where rollouts read the answer, EM, F1, cover-EM,
    the reward and its parts, the retrieved ids and the latencies.

    ``reset(seed=s, options=...)`` seeds sub-env ``i`` with ``s + i``. Options:
    ``{"examples": [QAExample | record, ...]}`` starts each reset sub-env on the given example (one per
    reset sub-env, in order) instead of one drawn from the dataset; ``{"reset_mask": (num_envs,) bool}``
    resets only the marked sub-envs.

    Autoreset modes (``metadata["autoreset_mode"]``):

    - ``DISABLED`` (default, for collecting one fixed batch of episodes): a finished sub-env stays
      finished until ``reset``. Stepping it is a no-op that makes no retriever call and returns ``""``,
      reward 0.0 and its final ``terminated`` / ``truncated`` flags again, with no info entries; so a
      rollout loops ``while not (terminated | truncated).all()`` and passes any string (e.g. ``""``)
      for finished sub-envs.
    - ``NEXT_STEP`` (Gymnasium's default): the step after an episode ends resets that sub-env, ignores
      its action and returns the new prompt with reward 0.0 and both flags False.
    - ``SAME_STEP``: the step that ends an episode resets the sub-env at once and returns the new
      prompt; the ending step's observation and info are in ``info["final_obs"]`` and
      ``info["final_info"]``.

    Args:
        num_envs: number of parallel episodes.
        dataset: as for :class:`~searchgym.env.search_env.SearchEnv` (loaded once and shared).
        retriever: shared by all sub-envs.
        config: shared by all sub-envs.
        tokenizer: counts budgets in the policy's tokens.
        autoreset_mode: an :class:`~gymnasium.vector.AutoresetMode` or its value.
    """

    def __init__(
        self,
        *,
        num_envs: int,
        dataset: DatasetLike | None,
        retriever: Retriever,
        config: EnvConfig | None = None,
        tokenizer: Tokenizer | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.DISABLED,
    ) -> None:
        if num_envs < 1:
            raise SearchgymError(f"num_envs={num_envs}: set num_envs to 1 or more")
        examples = resolve_examples(dataset)
        self.config = config or EnvConfig()
        self.retriever = retriever
        first = SearchEnv(dataset=examples, retriever=retriever, config=self.config, tokenizer=tokenizer)
        self.envs = [first] + [
            SearchEnv(
                dataset=examples,
                retriever=retriever,
                config=self.config,
                tokenizer=tokenizer,
                tools=first.tools,
            )
            for _ in range(num_envs - 1)
        ]
        self.num_envs = num_envs
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self.metadata = {"autoreset_mode": self.autoreset_mode}
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._observations = [""] * num_envs
        self._terminated = np.zeros(num_envs, dtype=np.bool_)
        self._truncated = np.zeros(num_envs, dtype=np.bool_)
        self._autoreset = np.zeros(num_envs, dtype=np.bool_)
        self._final_infos: list[dict[str, Any] | None] = [None] * num_envs
        self._has_reset = False

    @property
    def tool_schemas(self) -> list[dict[str, Any]]:
        """The sub-envs' tools as a chat template's ``tools=`` list."""
        return self.envs[0].tool_schemas

    @property
    def stop(self) -> tuple[str, ...]:
        """Strings that end a policy turn in the env's tool-call format."""
        return self.envs[0].stop

    @property
    def final_infos(self) -> tuple[dict[str, Any] | None, ...]:
        """Per sub-env, the info of the last step of its latest finished episode (None if none has)."""
        return tuple(None if info is None else dict(info) for info in self._final_infos)

    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[tuple[str, ...], dict[str, Any]]:
        """Reset all sub-envs, or those in ``options["reset_mask"]``; see the class docstring for options.

        Raises:
            SearchgymError: an unknown option, or a number of examples or seeds that does not match.
        """
        options = dict(options or {})
        unknown = set(options) - _RESET_OPTIONS
        if unknown:
            raise SearchgymError(f"unknown reset options {sorted(unknown)}: use {sorted(_RESET_OPTIONS)}")
        super().reset(seed=seed if isinstance(seed, int) else None)
        mask = np.asarray(options.get("reset_mask", np.ones(self.num_envs, dtype=np.bool_)), dtype=np.bool_)
        if mask.shape != (self.num_envs,):
            raise SearchgymError(
                f"reset_mask has shape {mask.shape}: give one bool per sub-env ({self.num_envs},)"
            )
        indices = np.flatnonzero(mask).tolist()
        examples = self._examples_for(indices, options.get("examples"))
        seeds = self._seeds_for(seed)
        infos: list[dict[str, Any] | None] = [None] * self.num_envs
        for index, example in zip(indices, examples, strict=True):
            reset_options = None if example is None else {"example": example}
            self._observations[index], infos[index] = self.envs[index].reset(
                seed=seeds[index], options=reset_options
            )
            self._terminated[index] = self._truncated[index] = self._autoreset[index] = False
            self._final_infos[index] = None
        self._has_reset = True
        return tuple(self._observations), stack_infos(infos)

    def step(
        self, actions: Sequence[str]
    ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """One turn for every sub-env: one call per tool (one retriever call) for all the sub-envs' requests.

        Raises:
            SearchgymError: the number of actions is not ``num_envs``.
            EpisodeStateError: ``reset`` was never called.
        """
        actions = list(actions)
        if len(actions) != self.num_envs:
            raise SearchgymError(
                f"got {len(actions)} actions for {self.num_envs} sub-envs: give one per sub-env"
            )
        if not self._has_reset:
            raise EpisodeStateError("call reset() before step()")
        outputs: list[StepOutput | None] = [self._idle_output(index) for index in range(self.num_envs)]
        stepping = [index for index, output in enumerate(outputs) if output is None]
        requests: dict[int, ToolRequest] = {}
        for index in stepping:
            request = self.envs[index].begin_step(actions[index])
            if request is not None:
                requests[index] = request
        results = call_batched(self.envs[0].tools, list(requests.values()))
        result_of = dict(zip(requests, results, strict=True))
        for index in stepping:
            outputs[index] = self._after_step(index, self.envs[index].finish_step(result_of.get(index)))
        return self._collect([output for output in outputs if output is not None])

    def close_extras(self, **kwargs: Any) -> None:
        """Close the sub-envs."""
        for env in self.envs:
            env.close()

    def _examples_for(self, indices: list[int], examples: Sequence[Any] | None) -> list[Any]:
        if examples is None:
            return [None] * len(indices)
        if len(examples) != len(indices):
            raise SearchgymError(
                f"options['examples'] has {len(examples)} examples for {len(indices)} reset sub-envs: "
                "give one per reset sub-env"
            )
        return list(examples)

    def _seeds_for(self, seed: int | Sequence[int | None] | None) -> list[int | None]:
        if seed is None:
            return [None] * self.num_envs
        if isinstance(seed, int):
            return [seed + index for index in range(self.num_envs)]
        if len(seed) != self.num_envs:
            raise SearchgymError(
                f"got {len(seed)} seeds for {self.num_envs} sub-envs: give an int or one per sub-env"
            )
        return list(seed)

    def _idle_output(self, index: int) -> StepOutput | None:
        """The output of a sub-env that does not take its action this step (None if it does)."""
        env = self.envs[index]
        if self._autoreset[index]:
            self._autoreset[index] = False
            self._observations[index], info = env.reset()
            self._terminated[index] = self._truncated[index] = False
            return self._observations[index], 0.0, False, False, info
        if env.episode_over:
            return "", 0.0, bool(self._terminated[index]), bool(self._truncated[index]), None
        return None

    def _after_step(self, index: int, output: tuple[str, float, bool, bool, dict[str, Any]]) -> StepOutput:
        """Record a sub-env's step; apply the autoreset mode when its episode ended."""
        observation, reward, terminated, truncated, info = output
        self._observations[index] = observation
        self._terminated[index], self._truncated[index] = terminated, truncated
        if not (terminated or truncated):
            return output
        self._final_infos[index] = info
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            self._autoreset[index] = True
        elif self.autoreset_mode == AutoresetMode.SAME_STEP:
            self._observations[index], reset_info = self.envs[index].reset()
            info = reset_info | {"final_obs": observation, "final_info": info}
            return self._observations[index], reward, terminated, truncated, info
        return output

    def _collect(
        self, outputs: list[StepOutput]
    ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        observations, rewards, terminated, truncated, infos = zip(*outputs, strict=True)
        return (
            tuple(observations),
            np.asarray(rewards, dtype=np.float64),
            np.asarray(terminated, dtype=np.bool_),
            np.asarray(truncated, dtype=np.bool_),
            stack_infos(list(infos)),
        )


def stack_infos(infos: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Per-env info dicts as Gymnasium's vector info: ``key -> (N,) array`` plus ``_key -> (N,) mask``.

    Unlike ``VectorEnv._add_info``, the dtype is chosen from all values of a key, so a None among
    floats (a reward that could not be computed) gives an object array instead of an error. Nested
    dicts are stacked the same way.

    Examples:
        >>> stacked = stack_infos([{"em": 1.0}, None, {"em": None}])
        >>> stacked["em"], stacked["_em"]
        (array([1.0, None, None], dtype=object), array([ True, False,  True]))
    """
    keys = list(dict.fromkeys(key for info in infos if info is not None for key in info))
    stacked: dict[str, Any] = {}
    for key in keys:
        present = [info is not None and key in info for info in infos]
        values = [None if info is None else info.get(key) for info in infos]
        given = [value for value, has in zip(values, present, strict=True) if has]
        if all(isinstance(value, Mapping) for value in given):
            stacked[key] = stack_infos(
                [value if has else None for value, has in zip(values, present, strict=True)]
            )
        else:
            stacked[key] = _stack_values(values, given)
        stacked[f"_{key}"] = np.asarray(present, dtype=np.bool_)
    return stacked


def _stack_values(values: list[Any], given: list[Any]) -> np.ndarray:
    if all(isinstance(value, bool | np.bool_) for value in given):
        return np.asarray([bool(value) for value in values], dtype=np.bool_)
    if all(isinstance(value, int | float | np.number) and not isinstance(value, bool) for value in given):
        dtype = np.int64 if all(isinstance(value, int | np.integer) for value in given) else np.float64
        return np.asarray([0 if value is None else value for value in values], dtype=dtype)
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array
