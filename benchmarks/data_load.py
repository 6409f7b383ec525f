"""Omniglot load times: the first load decodes the archives, later loads read the uint8 cache.

    python benchmarks/data_load.py --root ../shared/data --size 28 --repeats 5

Uses a fresh temporary cache folder (METAKIT_CACHE) so the first load really decodes; the data root
must be read-only for that (as ../shared/data is), else the cache beside the archives is used.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["METAKIT_CACHE"] = cache
        from metakit.data import load_omniglot

        start = time.perf_counter()
        data = load_omniglot("train", root=args.root, image_size=args.size)
        first = time.perf_counter() - start
        again = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            load_omniglot("train", root=args.root, image_size=args.size)
            again.append(time.perf_counter() - start)
    print(f"{data}: first load (decode {args.size}x{args.size} + cache) {first:.1f} s; "
          f"cached load median {statistics.median(again):.2f} s over {args.repeats}")
    from metakit.data import EpisodeSampler

    for shots in (1, 5):
        sampler = EpisodeSampler(data, ways=60, shots=shots, queries=5, seed=0)
        times = []
        for _ in range(50):
            start = time.perf_counter()
            sampler.sample()
            times.append(time.perf_counter() - start)
        print(f"sampling one 60-way {shots}-shot 5-query episode: median {1000 * statistics.median(times):.2f} ms "
              f"over 50")


if __name__ == "__main__":
    main()
