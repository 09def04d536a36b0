"""DP-SGD across processes with `jax.distributed`: each process loads its own shard of the data.

A small Flax NNX classifier is trained with DP-SGD: `ghost_clipped_grad_sum`
(per-example clipping without per-example gradients), `dp_aggregate`
(Gaussian noise, once, on the global sum) and adam. The dataset is cut into
`--shards` shards; each process loads only the shards it owns
(`shard % num_processes == process_id`), Poisson-samples each of them (every
example in with probability `q = expected_batch_size / dataset_size`,
independently: Poisson sampling of the whole dataset) and contributes its
rows to one global batch through `jax.make_array_from_process_local_data`.
The jitted step runs on the global mesh of every process's devices: each
device clips its own examples, XLA sums over all of them, and the noise is
drawn from the same key on every process, so every process releases the
same update. The accountant counts the global sampling rate `q`.

The inclusion of example `j` of shard `s` at step `t` is drawn from
`fold_in(fold_in(sampling_key, t), s)`: the same whichever process owns the
shard, so a run on one process with all the devices makes the same batches,
and, with the same key, the same params (what `tests/test_distributed.py`
checks).

Run on one machine (two processes of four CPU devices each, gloo collectives):

    python examples/dp_multiprocess.py --num-processes 2 --process-id 0 &
    python examples/dp_multiprocess.py --num-processes 2 --process-id 1

or on one process (`--num-processes 1`, the default). Across hosts, give
every process the same `--coordinator host:port` of process 0. Each
process holds the padded rows of its shards (`--capacity` per shard, by
default the whole shard: never truncated, so the accounting needs no
truncation term), so the batch shape is fixed and the step compiles once.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--coordinator", default="localhost:12355", help="host:port of process 0")
    ap.add_argument(
        "--local-devices", type=int, default=None, help="CPU devices per process (default 8 / processes)"
    )
    ap.add_argument("--cpu", action="store_true", help="force the CPU backend (gloo collectives)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dataset-size", type=int, default=64)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--capacity", type=int, default=None, help="padded rows per shard (default: the shard)")
    ap.add_argument("--expected-batch-size", type=int, default=16)
    ap.add_argument("--l2-norm-clip", type=float, default=1.0)
    ap.add_argument("--noise-multiplier", type=float, default=1.0)
    ap.add_argument("--learning-rate", type=float, default=1e-2)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default=None, help="orbax checkpoint folder written by every process")
    ap.add_argument("--restore", default=None, help="orbax checkpoint to start from (e.g. on one process)")
    ap.add_argument("--start-step", type=int, default=0, help="the first step's number (after --restore)")
    ap.add_argument("--out", default=None, help="JSON of the params after each step and epsilon (process 0)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.cpu or args.num_processes > 1:
        devices = args.local_devices or max(8 // args.num_processes, 1)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
        )
    import jax

    if args.num_processes > 1:
        if os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )
    run(args)


def dataset(size: int, seed: int):
    """The whole dataset (every process can make it; each keeps only its shards' rows)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((size, 4)).astype(np.float32)
    y = (x @ rng.standard_normal((4, 3)) > 0).argmax(-1).astype(np.int32)
    return x, y


def run(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import optaxclip
    from optaxclip import privacy

    n, shards = args.dataset_size, args.shards
    if n % shards or shards % jax.process_count():
        raise SystemExit(f"--dataset-size {n} must split into --shards {shards}, shared by the processes")
    shard_size = n // shards
    capacity = args.capacity or shard_size
    mine = [s for s in range(shards) if s % jax.process_count() == jax.process_index()]
    rows = shards * capacity  # the global batch: every shard's padded rows
    if rows % jax.device_count():
        raise SystemExit(
            f"{shards} shards x capacity {capacity} must split over {jax.device_count()} devices"
        )
    mesh = jax.make_mesh((jax.device_count(),), ("data",), (AxisType.Auto,))
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    x_all, y_all = dataset(n, args.seed)  # a real run reads only its own shards from storage
    local_x = [x_all[s * shard_size : (s + 1) * shard_size] for s in mine]
    local_y = [y_all[s * shard_size : (s + 1) * shard_size] for s in mine]
    q = args.expected_batch_size / n  # the global sampling rate: what the accountant counts

    class Classifier(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(4, 16, rngs=rngs)
            self.out = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    model = Classifier(nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.device_put(params, replicated)

    def loss_one(params, x, y):  # one example
        logits = nnx.merge(graphdef, params)(x[None])[0]
        return -jax.nn.log_softmax(logits)[y]

    key = jax.random.key(args.seed)
    sampling_key, noise_key = jax.random.split(key)
    tx = optax.chain(
        optaxclip.dp_aggregate(
            args.l2_norm_clip, args.noise_multiplier, noise_key, expected_batch_size=args.expected_batch_size
        ),
        optax.adam(args.learning_rate),
    )
    opt_state = jax.device_put(tx.init(params), replicated)
    if args.restore:
        import orbax.checkpoint as ocp

        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
        restored = ocp.StandardCheckpointer().restore(pathlib.Path(args.restore).absolute(), target)
        params, opt_state = restored["params"], restored["opt_state"]
    clipped_sum = optaxclip.ghost_clipped_grad_sum(loss_one, batch_argnums=(1, 2))

    @jax.jit
    def step(params, opt_state, x, y, mask):
        summed = clipped_sum(params, x, y, l2_norm_clip=args.l2_norm_clip, mask=mask)
        updates, opt_state = tx.update(summed, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def local_batch(t):
        """This process's rows at step t: each of its shards Poisson-sampled, padded to `capacity`."""
        xs, ys, masks = [], [], []
        for s, sx, sy in zip(mine, local_x, local_y, strict=True):
            keep = jax.random.bernoulli(
                jax.random.fold_in(jax.random.fold_in(sampling_key, t), s), q, (shard_size,)
            )
            idx = np.flatnonzero(np.asarray(keep))
            if len(idx) > capacity:  # never truncate silently: the accounting assumes no truncation
                raise SystemExit(f"step {t}: shard {s} sampled {len(idx)} > --capacity {capacity}")
            pad = capacity - len(idx)
            xs.append(np.concatenate([sx[idx], np.zeros((pad, 4), np.float32)]))
            ys.append(np.concatenate([sy[idx], np.zeros(pad, np.int32)]))
            masks.append(np.arange(capacity) < len(idx))
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(masks)

    def flat(params):
        return {
            jax.tree_util.keystr(p): np.asarray(v).tolist()
            for p, v in jax.tree_util.tree_leaves_with_path(params)
        }

    history = [flat(params)]  # params before the first step and after each
    for t in range(args.start_step, args.start_step + args.steps):
        lx, ly, lm = local_batch(t)
        x, y, mask = (
            jax.make_array_from_process_local_data(batch_sharding, a, (rows,) + a.shape[1:])
            for a in (lx, ly, lm)
        )
        params, opt_state = step(params, opt_state, x, y, mask)
        history.append(flat(params))

    steps = args.start_step + args.steps
    eps = privacy.epsilon(args.noise_multiplier, q, steps, args.delta) if steps else 0.0
    if args.checkpoint:
        import orbax.checkpoint as ocp

        checkpointer = ocp.StandardCheckpointer()  # every process calls save; orbax coordinates them
        checkpointer.save(
            pathlib.Path(args.checkpoint).absolute(), {"params": params, "opt_state": opt_state}
        )
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        print(
            f"processes {jax.process_count()} devices {jax.device_count()} steps {steps} "
            f"sampling rate {q:.4f} epsilon {eps:.4f} (delta {args.delta})"
        )
        if args.out:
            out = {"params": history, "sampling_rate": q, "epsilon": eps, "steps": steps}
            pathlib.Path(args.out).write_text(json.dumps(out))
    return params, opt_state


if __name__ == "__main__":
    main()
