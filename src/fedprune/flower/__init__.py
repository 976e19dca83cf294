"""fedprune on a real Flower federation (SuperLink / SuperNodes, flwr >= 1.42 Message API).

The only package that imports flwr. It adds transport and nothing else: the ServerApp
(`server_app.app`) runs the round loop of `fedprune.sim.runner` through
`strategy.FedpruneStrategy` — the same selection registry, payload codecs, update
validation, aggregation rule and report writers — and the ClientApp (`client_app.app`)
runs the method's local step on the SuperNode's partition. The same two apps run on Flower's
simulation engine (Ray), whose virtual SuperNodes get `partition-id` / `num-partitions` by
themselves. See docs/flower.md.
"""

import os

# Ray (Flower's simulation backend) reports usage statistics to the network unless told not
# to; this package is imported before the simulation engine starts Ray. `=1` opts back in.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
