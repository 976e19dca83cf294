"""Federated methods: one file each, one registry (`METHODS`).

A method decides what a selected client receives, trains and sends, how its payload is
encoded and decoded, how the server aggregates and how the global state is evaluated
(`base.Method`). The round loop (sim/runner.py) calls the same objects in process and over
Flower. Importing this package registers every method.
"""

from fedprune.methods import aoh, fedavg, fedspallm, prufed, random_heads  # noqa: F401 - registers
from fedprune.methods.base import METHODS, LocalResult, Method, build_method

__all__ = ["METHODS", "LocalResult", "Method", "build_method"]
