"""A local Ray cluster in its own process for the tests of runner/cluster (one per module).

Run as `python tests/ray_cluster.py NUM_CPUS`: starts Ray, prints its GCS address on one
line, and shuts Ray down when its standard input closes (the test module's end). Ray's own
processes share its fate, so a killed helper leaves none behind.
"""

from __future__ import annotations

import os
import sys

# Loopback only: the cluster's processes listen on 127.0.0.1 and name it as their address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray


def main() -> None:
    context = ray.init(
        num_cpus=int(sys.argv[1]),
        include_dashboard=False,
        log_to_driver=False,
    )
    sys.stdout.write(context.address_info["gcs_address"] + "\n")
    sys.stdout.flush()
    sys.stdin.read()
    ray.shutdown()


if __name__ == "__main__":
    main()
