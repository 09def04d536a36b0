"""DP-SGD across 2 processes x 4 CPU devices (issue 29.2), run as a user runs
examples/dp_multiprocess.py: `jax.distributed` over gloo, each process loading and
Poisson-sampling its own shard, `ghost_clipped_grad_sum` + `dp_aggregate` + adam on an NNX
model. Checked against one process holding all the data with the same key.

About a minute on 2 cores: marked `distributed`, run by `make test-distributed` (and CI).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from optaxclip import privacy

pytestmark = pytest.mark.distributed

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "dp_multiprocess.py"
STEPS, MORE = 5, 2
N, EXPECTED_BATCH, NOISE, DELTA = 64, 16, 1.0, 1e-5
TIMEOUT = 420


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(EXAMPLE.parents[1]))
    env.pop("XLA_FLAGS", None)  # the example sets the device count
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(*args):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), *args], env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return proc.stdout


def _params(path, index):
    return {k: np.asarray(v) for k, v in json.loads(path.read_text())["params"][index].items()}


def _assert_params_close(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], err_msg=k, **tol)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp_multiprocess")
    common = ["--dataset-size", str(N), "--expected-batch-size", str(EXPECTED_BATCH)]
    common += ["--noise-multiplier", str(NOISE), "--delta", str(DELTA)]
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--num-processes", "2", "--process-id", str(i)]
            + ["--coordinator", f"localhost:{port}", "--local-devices", "4"]
            + ["--checkpoint", str(tmp / "ckpt"), "--out", str(tmp / f"two{i}.json")]
            + ["--steps", str(STEPS), *common],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err[-4000:]
    # One process, all 8 devices and all the data, the same key: 7 steps.
    one = _run(
        "--cpu", "--local-devices", "8", "--out", str(tmp / "one.json"), "--steps", str(STEPS + MORE), *common
    )
    # The checkpoint of the 2-process run, restored on one process (one device), then 2 more steps.
    restored = _run(
        "--cpu", "--local-devices", "1", "--restore", str(tmp / "ckpt"), "--start-step", str(STEPS),
        "--out", str(tmp / "restored.json"), "--steps", str(MORE), *common,
    )  # fmt: skip
    return tmp, outs[0][0], one, restored


def test_two_processes_equal_one_process_with_the_same_key(runs):
    tmp, two_out, _, _ = runs
    assert "processes 2 devices 8 steps 5" in two_out
    two = json.loads((tmp / "two0.json").read_text())
    assert len(two["params"]) == STEPS + 1
    for t in range(STEPS + 1):  # after every step, not only the last
        _assert_params_close(
            _params(tmp / "two0.json", t), _params(tmp / "one.json", t), rtol=1e-6, atol=1e-7
        )
    start, end = _params(tmp / "two0.json", 0), _params(tmp / "two0.json", STEPS)
    assert max(float(np.max(np.abs(end[k] - start[k]))) for k in start) > 1e-3  # it trained


def test_accountant_counts_the_global_sampling_rate(runs):
    tmp, two_out, _, _ = runs
    two = json.loads((tmp / "two0.json").read_text())
    q = EXPECTED_BATCH / N  # global: each process samples its 32 examples at this rate
    assert two["sampling_rate"] == q
    assert two["epsilon"] == privacy.epsilon(NOISE, q, STEPS, DELTA)
    assert f"sampling rate {q:.4f} epsilon {two['epsilon']:.4f}" in two_out


def test_checkpoint_written_by_both_processes_restores_on_one(runs):
    tmp, _, _, restored_out = runs
    assert "processes 1 devices 1 steps 7" in restored_out
    # Restored: exactly the 2-process run's params.
    _assert_params_close(_params(tmp / "restored.json", 0), _params(tmp / "two0.json", STEPS), rtol=0, atol=0)
    # Its optimizer state (adam moments, the DP key) continues as the uninterrupted run.
    for t in range(1, MORE + 1):
        _assert_params_close(
            _params(tmp / "restored.json", t), _params(tmp / "one.json", STEPS + t), rtol=1e-6, atol=1e-7
        )
