"""Train state, optimiser, device mesh and the jitted train / eval steps.

Every step shards the batch over all devices along one mesh axis ``"data"`` (``NamedSharding(mesh,
P("data"))``) and keeps parameters and optimiser state replicated (``P()``); XLA inserts the gradient
all-reduce. Batches are padded to a multiple of the device count with weight-0 examples
(``train.data.batch_shape``), and losses are weighted means over the global batch, so the result does not
depend on the number of devices. Random numbers come from ``fold_in(state.rng, state.step)``, which makes
them a function of the step only (exact resume) and, because ``jax.jit`` semantics do not depend on
sharding, the same on 1 or many devices.

Multi-host (e.g. a TPU pod slice or several GPU hosts): every process must call
``jax.distributed.initialize()`` before any other JAX call (``blossom-train --distributed`` does; on Cloud
TPU, SLURM and Open MPI it finds its arguments itself, elsewhere pass the coordinator address, the number
of processes and the process id), then run the same command on every host::

    # on each of the N hosts (I = 0..N-1); --out on a filesystem all hosts share
    blossom-train --distributed --coordinator-address host0:1234 --num-processes N --process-id $I \
        --data /shared/ml-1m_5core.txt --out /shared/runs/ml1m

``jax.devices()`` then lists the devices of all hosts and the mesh spans them. Every process builds the same
global batch from the same seed and ``DeviceMesh.put`` hands each process's devices their rows; metrics
are gathered with ``multihost_utils.process_allgather``; orbax writes checkpoints collectively; only
process 0 writes logs and results. (Designed for, not tested on, several hosts: the tests cover several
devices of one host.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train.metrics import rank_stats
from train.objectives import LossFn


class TrainState(flax.struct.PyTreeNode):
    """step int32 [], params (pytree), opt_state (optax), rng uint32 [2] (base key of the run)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def make_optimizer(learning_rate: float, warmup_steps: int = 0, weight_decay: float = 0.0,
                   grad_clip_norm: float = 0.0) -> optax.GradientTransformation:
    """Adam (AdamW when weight_decay > 0) with optional linear warmup and global-norm clipping."""
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    lr: Any = learning_rate
    if warmup_steps > 0:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
            [warmup_steps])
    adam = optax.adamw(lr, weight_decay=weight_decay) if weight_decay > 0 else optax.adam(lr)
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adam) if grad_clip_norm > 0 else adam


@dataclass
class DeviceMesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes), axis name "data"."""

    mesh: Mesh

    @classmethod
    def create(cls, devices: list | None = None) -> "DeviceMesh":
        return cls(Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",)))

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batched(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Global host batch (identical on every process) -> arrays sharded along axis 0."""
        sharding = self.batched
        return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
                for k, v in batch.items()}

    def replicate(self, tree: Any) -> Any:
        return jax.device_put(tree, self.replicated)

    @staticmethod
    def fetch(x: jax.Array) -> np.ndarray:
        """A (possibly multi-host sharded) array as one host numpy array."""
        if jax.process_count() > 1:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)


def init_params(model: nn.Module, rng: jax.Array, max_len: int) -> Any:
    """Initial parameters from a dummy [1, max_len] batch."""
    seq = jnp.ones((1, max_len), jnp.int32)
    return model.init({"params": rng, "dropout": rng}, seq, jnp.ones((1,), jnp.int32))["params"]


def make_init(model: nn.Module, tx: optax.GradientTransformation, max_len: int, mesh: DeviceMesh
              ) -> Callable[[int], TrainState]:
    """seed -> fresh replicated train state (one compilation for every seed).

    Parameters come from split 0 of key(seed), the step RNG base key from split 1.
    """

    def create(seed: jax.Array) -> TrainState:
        init_rng, step_rng = jax.random.split(jax.random.PRNGKey(seed))
        params = init_params(model, init_rng, max_len)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), step_rng)

    jitted = jax.jit(create, out_shardings=mesh.replicated)
    return lambda seed: jitted(jnp.asarray(seed, jnp.uint32))


def create_state(model: nn.Module, tx: optax.GradientTransformation, seed: int, max_len: int,
                 mesh: DeviceMesh) -> TrainState:
    """Fresh, replicated train state (see ``make_init``)."""
    return make_init(model, tx, max_len, mesh)(seed)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, max_len: int, mesh: DeviceMesh
                   ) -> TrainState:
    """Shapes/dtypes/shardings of a train state (orbax restore target), no computation."""
    def create() -> TrainState:
        params = init_params(model, jax.random.PRNGKey(0), max_len)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0))

    shapes = jax.eval_shape(create)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=mesh.replicated), shapes)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, loss_fn: LossFn, mesh: DeviceMesh
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """jit(state, batch) -> (new state, {"loss", "weight", "grad_norm"}); the state is donated."""

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)

        def objective(params):
            return loss_fn(model, {"params": params}, batch, rng)

        (loss, weight), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, {"loss": loss, "weight": weight, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, in_shardings=(mesh.replicated, mesh.batched),
                   out_shardings=(mesh.replicated, mesh.replicated), donate_argnums=(0,))


def make_eval_step(model: nn.Module, mesh: DeviceMesh) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
    """jit(params, batch) -> (greater int32 [B], ties int32 [B]) of each target (train.metrics.rank_stats).

    The batch holds seq, len, target (+ optional candidates [B, C] or history [B, H]).
    """

    def step(params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
        logits = model.apply({"params": params}, batch["seq"], batch["len"], method="score")
        return rank_stats(logits, batch["target"], batch.get("candidates"), batch.get("history"))

    return jax.jit(step, in_shardings=(mesh.replicated, mesh.batched),
                   out_shardings=(mesh.batched, mesh.batched))


def model_rank_fn(eval_step: Callable, params: Any, mesh: DeviceMesh
                  ) -> Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """Adapts a jitted eval step to ``train.evaluation.RankFn`` (host batch in, host ranks out)."""
    keys = ("seq", "len", "target", "candidates", "history")

    def rank_fn(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        g, t = eval_step(params, mesh.put({k: batch[k] for k in keys if k in batch}))
        return mesh.fetch(g), mesh.fetch(t)

    return rank_fn
