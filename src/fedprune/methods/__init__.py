"""Federated methods: one file each, one registry (`METHODS`).

A method decides what a selected client trains and sends, how its payload is encoded and
decoded, and how the server aggregates. The round loop (sim/runner.py) and the Flower app
call the same objects.
"""

from fedprune.methods.base import METHODS, LocalResult, Method, build_method
from fedprune.methods.fedavg import FedAvg
from fedprune.methods.heads import HeadPruning

__all__ = ["METHODS", "FedAvg", "HeadPruning", "LocalResult", "Method", "build_method"]
