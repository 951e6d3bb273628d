"""Scale-out on Ray: one job across a cluster in shards, with the local runner's guarantees.

The only package that imports ray, and only `driver` does so at import: `load_driver` turns
a missing extra into a clear exit 2. The local runner never imports this package.

    shards.py   the plan: row ranges of the input, once, into shards.json
    shard.py    one shard: the local pipeline over its rows under a lease (no ray)
    driver.py   submit / resume: ray.init, one task per unsettled shard, retries, summary

Keys never travel. Task arguments hold the spec (which names the key's environment
variable, never its value); each worker reads the variable from its own environment. A
local Ray started for the run (or a cluster started from a shell that has it) passes the
driver's environment on to its workers. On a real cluster, set the variable in the
environment of `ray start` on every node (a systemd unit's EnvironmentFile, a Kubernetes
Secret mounted as an environment variable): `runtime_env={"env_vars": ...}` is NOT used,
as it would put the key into the task's metadata held by the cluster's control store.
"""

from __future__ import annotations

import os
from types import ModuleType

from runner.errors import UsageError

INSTALL_HINT = "uv sync --extra ray, or pip install 'runner[ray]'"


def load_driver(*, local: bool = False) -> ModuleType:
    """runner.cluster.driver, or a UsageError naming how to install Ray. `local`: a Ray
    started for the run, which listens on loopback only (no other node joins it)."""
    # Read by ray when it is imported. No usage statistics sent anywhere. Under `uv run`,
    # Ray would package the working folder and start each worker through uv (~10 s a
    # worker): workers use this interpreter and its installed packages instead.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        from runner.cluster import driver
    except ImportError as exc:
        if exc.name is not None and exc.name != "ray" and not exc.name.startswith("ray."):
            raise
        raise UsageError(f"--ray needs Ray, which is not installed ({INSTALL_HINT})") from None
    return driver
