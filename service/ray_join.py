"""`ray start --address HEAD` for a second node on this machine, kept on loopback:
`python -m service.ray_join start --address=127.0.0.1:PORT --node-ip-address=127.0.0.1 ...`.

On Linux, plain `ray start` offers two choices for a joining node, neither usable here: with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (loopback) it refuses to join at all, and with it at 1 it
replaces 127.0.0.1, in --address and --node-ip-address alike, by the machine's outward IP, so the
node's raylet and agents listen on every interface. This runs Ray's own `ray start` with the
variable at 0 (so the node and every process it starts stay on loopback, as a head does) and two
changes to this one process: the join is allowed, and 127.0.0.1 stays 127.0.0.1. Used by
service.cluster.LocalRay(head_address=...); real clusters run plain `ray start` (deploy/).
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants
    import ray._private.services as services
    from ray.scripts.scripts import main as ray_cli

    loopback = services.get_node_ip_address()          # 127.0.0.1 while the variable is 0
    ray_constants.ENABLE_RAY_CLUSTER = True             # let this `ray start --address` join
    services.get_node_ip_address = lambda address=None: loopback
    sys.argv[0] = "ray"
    return ray_cli()


if __name__ == "__main__":
    sys.exit(main())
