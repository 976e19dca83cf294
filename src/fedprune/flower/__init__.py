"""fedprune on a real Flower federation (SuperLink / SuperNodes, flwr >= 1.42 Message API).

The only package that imports flwr. It adds transport and nothing else: the ServerApp
(`server_app.app`) runs the round loop of `fedprune.sim.runner` through
`strategy.FedpruneStrategy` — the same selection registry, payload codecs, update
validation, aggregation rule and report writers — and the ClientApp (`client_app.app`)
runs the method's local step on the SuperNode's partition. See docs/flower.md.
"""
