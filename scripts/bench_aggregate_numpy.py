#!/usr/bin/env python3
"""The numpy side of scripts/bench_aggregate.sh: an example-weighted mean of many LoRA updates of a
7B-shaped adapter (32 layers, q_proj and v_proj, A [16, 4096] and B [4096, 16], 8.4 M parameters),
the way the Python federated frameworks aggregate.

Two variants, both favourable to numpy (the updates are float32 arrays already in memory, no
deserialisation, and a few distinct ones are cycled exactly as `fedlora bench-aggregate` does):
  flower: Flower's `aggregate_inplace` (flwr/server/strategy/aggregate.py): scale by
          num_examples / total, then reduce(np.add) layer by layer, update after update;
  inplace: a preallocated accumulator with np.multiply(..., out=) and np.add(..., out=).
Prints one line per variant: seconds and updates per second."""

import argparse
import time
from functools import reduce

import numpy as np

LAYERS, HIDDEN, RANK = 32, 4096, 16


def update(seed):
    rng = np.random.default_rng(seed)
    arrays = []
    for _ in range(LAYERS):
        for _module in ("q_proj", "v_proj"):
            arrays.append(((rng.random((RANK, HIDDEN), dtype=np.float32) - 0.5) * 0.1))
            arrays.append(((rng.random((HIDDEN, RANK), dtype=np.float32) - 0.5) * 0.1))
    return arrays


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--distinct", type=int, default=4)
    args = parser.parse_args()
    updates = [update(seed) for seed in range(args.distinct)]
    weights = [1.0 + (client % 7) for client in range(args.clients)]
    parameters = sum(array.size for array in updates[0])
    pick = lambda client: updates[client % len(updates)]

    started = time.perf_counter()
    total = sum(weights)
    scaling = np.asarray([weight / total for weight in weights])
    params = [scaling[0] * x for x in pick(0)]
    for client in range(1, args.clients):
        res = (scaling[client] * x for x in pick(client))
        params = [reduce(np.add, layer_updates) for layer_updates in zip(params, res)]
    flower = time.perf_counter() - started

    started = time.perf_counter()
    accumulator = [np.zeros_like(x) for x in pick(0)]
    scratch = [np.empty_like(x) for x in pick(0)]
    for client in range(args.clients):
        for acc, tmp, x in zip(accumulator, scratch, pick(client)):
            np.multiply(x, np.float32(weights[client]), out=tmp)
            np.add(acc, tmp, out=acc)
    for acc in accumulator:
        acc /= np.float32(total)
    inplace = time.perf_counter() - started

    for name, seconds in (("flower", flower), ("inplace", inplace)):
        print(
            f"numpy {name}: {args.clients} updates of {parameters / 1e6:.2f} M parameters "
            f"(float32 in memory): {seconds:.2f} s, {args.clients / seconds:.1f} updates/s "
            f"(numpy {np.__version__})"
        )


if __name__ == "__main__":
    main()
