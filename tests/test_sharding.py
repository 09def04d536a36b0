"""Sharded parameters over 8 host devices, in a subprocess (XLA flags must be set first)."""

import os
import pathlib
import subprocess
import sys

import pytest


@pytest.mark.distributed  # 8 forced host devices in a subprocess: make test-distributed
def test_sharded_norms_and_updates_match_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = pathlib.Path(__file__).with_name("_sharded_script.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SHARDING OK" in proc.stdout
    assert "dp 8 devices == 1 device" in proc.stdout
    for name in ("dp_aggregate", "dp_adaptive_aggregate"):
        assert f"{name} pipeline 8 devices == 1 device" in proc.stdout
    for name in ("global", "leaf", "value", "agc", "adaptive", "zscore", "adagc", "guard"):
        assert f"{name} sharded == unsharded" in proc.stdout
    assert "guard shard_map 8 devices == 1 device" in proc.stdout


@pytest.mark.distributed  # 8 forced host devices in a subprocess: make test-distributed
def test_dp_under_fsdp_sharding_draws_noise_per_shard():
    """Issue 29.1: collectives of the compiled DP step on FSDP-sharded params (see the script)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = pathlib.Path(__file__).with_name("_sharded_dp_script.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DP SHARDING OK" in proc.stdout
    for summer in ("clipped_grad_sum", "ghost_clipped_grad_sum"):
        for agg in ("dp_aggregate", "dp_adaptive_aggregate"):
            assert f"{summer}/{agg}: 0 collective-permute, no all-gather beyond" in proc.stdout
        assert f"{summer}: 3 DP steps sharded == one device" in proc.stdout
    for agg in ("dp_aggregate", "dp_adaptive_aggregate"):
        assert f"{agg}: same key, same release sharded and on one device" in proc.stdout
        assert f"{agg}: update on sharded sums holds no full-size kernel" in proc.stdout
        assert f"{agg}: explicit mesh, noise drawn per shard, same release as one device" in proc.stdout
