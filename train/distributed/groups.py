"""The driver's handles on the run's actors: start them in their bundles, call them, notice when one dies.

Every call on a group waits for its actors as they finish, so a dead actor is noticed as soon as Ray
reports it, even while the others are still busy (or blocked in a collective waiting for the dead one).
The error names the actor, where it ran and why it died; the trainer then stops every actor.
"""

import itertools
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from searchgym.env import QAExample
from searchgym.errors import SearchgymError
from searchgym.policy.generation import SamplingParams
from searchgym.policy.trajectory import Trajectory
from searchgym.retriever.base import Passage
from searchgym.retriever.client import RetrieverUnavailableError
from searchgym.train.checkpoint import TrainerState
from searchgym.train.config import TrainConfig
from searchgym.train.distributed.actors import (
    LearnerActor,
    RetrieverReplica,
    RolloutWorker,
    Whereabouts,
)
from searchgym.train.distributed.cluster import Placement
from searchgym.train.distributed.placement import ActorPlace, split_evenly
from searchgym.train.learner import LearnerStep
from searchgym.train.loop import Learner

logger = logging.getLogger(__name__)

_PROBE_TIMEOUT_S = 10.0
"""How long a liveness probe waits: a dead actor fails at once, a busy one answers late (or not in time)."""
_REPLICA_RESTARTS = 3
"""A retrieval replica holds no state and a search can be repeated, so Ray restarts it and retries."""


class WorkerDiedError(SearchgymError):
    """An actor of the run died; the message names it, says where it ran and why it died."""


@dataclass(frozen=True, slots=True)
class Member:
    """One actor of the run.

    Attributes:
        name: its role and index, e.g. ``"rollout worker 1"``.
        handle: Ray's handle on it.
        whereabouts: where it runs (``"pid 1234 on node-3"``; ``"while starting"`` until it is up).
    """

    name: str
    handle: ActorHandle
    whereabouts: Whereabouts | str


class Roster:
    """Every actor of the run, for calls that report a death by the name of the actor that died.

    Args:
        run: names the run's actors in Ray (``"rollout worker 1 @ runs/demo"``), so that runs that share
            a driver keep their actors apart.
    """

    def __init__(self, run: str) -> None:
        self.run = run
        self.members: list[Member] = []

    def actor_name(self, place: ActorPlace) -> str:
        """The Ray name of the actor at ``place``."""
        return f"{place.role} {place.index} @ {self.run}"

    def start(
        self,
        actor_class: type,
        places: Sequence[ActorPlace],
        placement: Placement,
        arguments: Callable[[ActorPlace], Mapping[str, Any]],
        **options: Any,
    ) -> list[Member]:
        """Start one actor per place in its bundle and wait until each is constructed.

        Each actor gets its :meth:`actor_name` in this driver's namespace, so ``ray.get_actor`` finds it
        and Ray's state tools show it by that name.
        """
        remote_class: Any = ray.remote(actor_class)
        handles = [
            remote_class.options(
                name=self.actor_name(place),
                num_cpus=place.cpus,
                num_gpus=place.gpus,
                scheduling_strategy=placement.strategy(place),
                **options,
            ).remote(**arguments(place))
            for place in places
        ]
        # Listed before they are up, so that one dying in its constructor is found by name.
        starting = [
            Member(f"{place.role} {place.index}", handle, "while starting")
            for place, handle in zip(places, handles, strict=True)
        ]
        first = len(self.members)
        self.members.extend(starting)
        whereabouts = self.gather([(member, member.handle.whereabouts.remote()) for member in starting])
        started = [
            Member(member.name, member.handle, where)
            for member, where in zip(starting, whereabouts, strict=True)
        ]
        self.members[first:] = started
        return started

    def gather(self, calls: Sequence[tuple[Member, Any]]) -> list[Any]:
        """The results of ``(member, object ref)`` calls in order, waiting for them as they finish.

        Raises:
            WorkerDiedError: an actor died (the one called, or one whose result it needed).
        """
        index_of: dict[Any, int] = {ref: index for index, (_, ref) in enumerate(calls)}
        results: list[Any] = [None] * len(calls)
        pending = list(index_of)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            index = index_of[ready[0]]
            try:
                results[index] = ray.get(ready[0])
            except RayActorError as error:
                raise WorkerDiedError(self._obituary(calls[index][0], error)) from error
        return results

    def _obituary(self, called: Member, error: RayActorError) -> str:
        """Which actors are dead, where they ran and Ray's reason (the called one's when no other is)."""
        dead = self.dead() or [called]
        names = ", ".join(f"{member.name} ({member.whereabouts})" for member in dead)
        reason = " ".join(str(error).split())
        return f"{names} died: {reason}"

    def dead(self) -> list[Member]:
        """The members that fail a liveness probe (busy ones that answer late count as alive)."""
        probes: dict[Any, Member] = {member.handle.whereabouts.remote(): member for member in self.members}
        ready, _ = ray.wait(list(probes), num_returns=len(probes), timeout=_PROBE_TIMEOUT_S)
        dead = []
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError:
                dead.append(probes[ref])
        return dead

    def stop(self) -> None:
        """Kill every actor (the run is over, or one of them died and the others may be waiting for it)."""
        for member in self.members:
            ray.kill(member.handle, no_restart=True)
        self.members.clear()


class ReplicatedRetriever:
    """A :class:`~searchgym.retriever.base.Retriever` over retrieval replicas, each called in turn.

    Each rollout worker holds its own copy, starting at its own replica, so that W workers spread their
    calls over the replicas. A replica that died is skipped (Ray restarts it meanwhile).

    Args:
        replicas: the replicas' handles.
        first: the replica of the first call.
    """

    def __init__(self, replicas: Sequence[ActorHandle], *, first: int = 0) -> None:
        self.replicas = list(replicas)
        self._turn = itertools.count(first)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Search on the next replica; on the following one if it is dead.

        Raises:
            RetrieverUnavailableError: every replica is dead.
        """
        start = next(self._turn)
        failures = []
        for offset in range(len(self.replicas)):
            replica = (start + offset) % len(self.replicas)
            try:
                return ray.get(self.replicas[replica].search.remote(queries, k))
            except RayActorError as error:
                failures.append(f"replica {replica}: {' '.join(str(error).split())[:200]}")
                logger.warning("retriever replica %d failed; trying the next one", replica)
        raise RetrieverUnavailableError("every retriever replica failed: " + "; ".join(failures))


class RetrieverReplicas:
    """The retrieval replicas of the run.

    Args:
        roster: the run's actors.
        members: the replicas.
    """

    def __init__(self, roster: Roster, members: Sequence[Member]) -> None:
        self.roster = roster
        self.members = list(members)

    @classmethod
    def start(cls, config: TrainConfig, placement: Placement, roster: Roster) -> "RetrieverReplicas":
        """Start the replicas; the first one alone, since it may build the default index others reuse."""
        places = placement.plan.retriever_replicas

        def arguments(place: ActorPlace) -> Mapping[str, Any]:
            return {"config": config.retriever}

        options = {"max_restarts": _REPLICA_RESTARTS, "max_task_retries": _REPLICA_RESTARTS}
        first = roster.start(RetrieverReplica, places[:1], placement, arguments, **options)
        rest = roster.start(RetrieverReplica, places[1:], placement, arguments, **options)
        return cls(roster, [*first, *rest])

    def client(self, worker: int) -> ReplicatedRetriever:
        """The retriever of rollout worker ``worker``."""
        return ReplicatedRetriever([member.handle for member in self.members], first=worker)

    def served(self) -> list[tuple[int, int]]:
        """``(calls, queries)`` each replica served."""
        return self.roster.gather([(member, member.handle.served.remote()) for member in self.members])


@dataclass(frozen=True, slots=True)
class BroadcastStarted:
    """Learner 0 has started to broadcast its weights; the rollout workers receive them as they load.

    Attributes:
        sender: learner 0.
        sent: the reference to its sending call (it ends when every worker has received).
    """

    sender: Member
    sent: Any


class RolloutWorkerGroup:
    """The rollout workers, as one :class:`~searchgym.train.loop.Rollout`: each runs a slice of every request.

    A submitted request starts on every worker at once; :meth:`collect` waits for their episodes. Requests
    queue on each worker in submission order, and so do weight loads (a worker's calls run one at a
    time): with ``rollout.max_staleness`` > 0, the requests submitted before an update generate with the
    weights they were submitted with while the learners update, and new weights load after them.

    Args:
        roster: the run's actors.
        members: the workers, in rank order.
    """

    def __init__(self, roster: Roster, members: Sequence[Member]) -> None:
        self.roster = roster
        self.members = list(members)
        self._calls: deque[list[tuple[Member, Any]]] = deque()

    @classmethod
    def start(
        cls,
        config: TrainConfig,
        placement: Placement,
        roster: Roster,
        *,
        replicas: RetrieverReplicas | None,
    ) -> "RolloutWorkerGroup":
        """Start the workers (the first one alone when each opens the retriever, which it may build)."""
        places = placement.plan.rollout_workers

        def arguments(place: ActorPlace) -> Mapping[str, Any]:
            return {
                "config": config,
                "index": place.index,
                "num_workers": len(places),
                "retriever": replicas.client(place.index) if replicas is not None else None,
                "cpus": place.cpus,
            }

        if replicas is not None:
            return cls(roster, roster.start(RolloutWorker, places, placement, arguments))
        first = roster.start(RolloutWorker, places[:1], placement, arguments)
        rest = roster.start(RolloutWorker, places[1:], placement, arguments)
        return cls(roster, [*first, *rest])

    def sync_weights(self, learner: Learner) -> None:
        """Every worker loads the learner's weights (the learner group's are an object-store reference)."""
        self.load_weights(learner.policy_state())

    def load_weights(self, state: Any) -> None:
        """Every worker loads ``state``: weights (``shareable_weights``), a reference, or a broadcast."""
        if isinstance(state, BroadcastStarted):
            receiving = [(member, member.handle.receive_weights.remote()) for member in self.members]
            self.roster.gather([(state.sender, state.sent), *receiving])
            return
        self.roster.gather([(member, member.handle.load_weights.remote(state)) for member in self.members])

    def submit(
        self, examples: Sequence[QAExample], *, sampling: SamplingParams, step: int, batch_size: int
    ) -> None:
        """Split ``examples`` into contiguous slices, one per worker, and start them."""
        parts = split_evenly(list(examples), len(self.members))
        self._calls.append(
            [
                (member, member.handle.run.remote(part, sampling=sampling, step=step, batch_size=batch_size))
                for member, part in zip(self.members, parts, strict=False)
                if part
            ]
        )

    def collect(self) -> list[Trajectory]:
        """The workers' episodes of the oldest request not yet collected, in the order of its examples."""
        calls = self._calls.popleft()
        return [trajectory for result in self.roster.gather(calls) for trajectory in result]


class LearnerGroup:
    """The data-parallel learners, as one :class:`~searchgym.train.loop.Learner`.

    Learner 0 writes checkpoints, exports and serves the weights. Sharded learners (FSDP2) hold only
    parts of them, so every learner takes part in those: each writes its shards, and all gather the
    whole weights that learner 0 writes or sends.

    Args:
        roster: the run's actors.
        members: the learners, in rank order.
        sharded: whether the learners shard their models.
    """

    def __init__(self, roster: Roster, members: Sequence[Member], *, sharded: bool = False) -> None:
        self.roster = roster
        self.members = list(members)
        self.sharded = sharded
        self._broadcast_dtype: str | None = None
        self._broadcasts = False

    @classmethod
    def start(cls, config: TrainConfig, placement: Placement, roster: Roster) -> "LearnerGroup":
        """Start the learners and join them in one torch.distributed process group (more than one)."""

        def arguments(place: ActorPlace) -> Mapping[str, Any]:
            return {"config": config, "rank": place.index, "cpus": place.cpus}

        members = roster.start(LearnerActor, placement.plan.learners, placement, arguments)
        lead = members[0]
        sharded = roster.gather([(lead, lead.handle.strategy.remote())])[0] == "shard"
        # A lone sharded learner still needs a process group: FSDP's units are collectives of one.
        if len(members) > 1 or sharded:
            address, port = roster.gather([(lead, lead.handle.rendezvous.remote())])[0]
            roster.gather(
                [
                    (member, member.handle.join.remote(address=address, port=port, world_size=len(members)))
                    for member in members
                ]
            )
        return cls(roster, members, sharded=sharded)

    @property
    def lead(self) -> Member:
        """Learner 0."""
        return self.members[0]

    def tokenizer(self) -> Any:
        """The policy's tokenizer."""
        return self.roster.gather([(self.lead, self.lead.handle.get_tokenizer.remote())])[0]

    def step(self, trajectories: Sequence[Trajectory]) -> LearnerStep:
        """Experience and update on every learner (each fetches the episodes once from the object store)."""
        shared = ray.put(list(trajectories))
        results = self.roster.gather([(member, member.handle.step.remote(shared)) for member in self.members])
        return results[0]

    def connect(self, workers: "RolloutWorkerGroup", *, dtype: str | None) -> None:
        """Open a weight-sync group of learner 0 and the rollout workers: weights go by broadcast from now on.

        Args:
            workers: the rollout workers.
            dtype: the dtype the weights travel in (the engines'), or None for the learner's own.
        """
        address, port = self.roster.gather([(self.lead, self.lead.handle.rendezvous.remote())])[0]
        size = len(workers.members) + 1
        calls = [
            (
                self.lead,
                self.lead.handle.join_weight_broadcast.remote(address=address, port=port, world_size=size),
            )
        ]
        calls += [
            (member, member.handle.join_weight_broadcast.remote(address=address, port=port, world_size=size))
            for member in workers.members
        ]
        self.roster.gather(calls)
        self._broadcasts, self._broadcast_dtype = True, dtype

    def policy_state(self) -> Any:
        """Learner 0's policy weights for the rollout workers' ``load_weights``.

        Through the object store: a reference to them, ready there (not copied here). By broadcast: the
        broadcast, started (the workers receive it as they load).
        """
        if self._broadcasts:
            sent: Any = self.lead.handle.broadcast_weights.remote(self._broadcast_dtype)
            self._gather_on_the_others()
            return BroadcastStarted(self.lead, sent)
        state: Any = self.lead.handle.policy_state.remote()
        self._gather_on_the_others()
        ray.wait([state], fetch_local=False)
        return state

    def _gather_on_the_others(self) -> None:
        """Sharded: learners 1..N-1 take part in gathering the weights that learner 0 was just asked for."""
        if self.sharded:
            self.roster.gather(
                [(member, member.handle.gather_policy.remote()) for member in self.members[1:]]
            )

    def save(self, state: TrainerState) -> Path:
        """Learner 0 writes a checkpoint (sharded: every learner writes its shards)."""
        writers = self.members if self.sharded else [self.lead]
        return self.roster.gather([(member, member.handle.save.remote(state)) for member in writers])[0]

    def load(self, path: Path, *, restore_rng: bool) -> TrainerState:
        """Every learner loads the checkpoint at ``path``; returns the trainer's state from it."""
        calls = [
            (member, member.handle.load.remote(path, restore_rng=restore_rng)) for member in self.members
        ]
        return self.roster.gather(calls)[0]

    def export(self, target: Path) -> Path:
        """Learner 0 writes the final policy as a Hugging Face folder (sharded: gathered by every learner)."""
        writers = self.members if self.sharded else [self.lead]
        return self.roster.gather([(member, member.handle.export.remote(target)) for member in writers])[0]
