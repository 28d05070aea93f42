"""Claim (issue 6): the index types `blip2 index build` picks answer queries faster than exact search at the
recall they were tuned to.

One run: a synthetic corpus of clustered unit vectors (like query embeddings: --vectors, --dim) and held-out
queries from the same clusters; for each of HNSW and IVF-PQ (+fp16 refine) it measures the build time (train +
add), tunes the search parameters to recall@10 >= 0.95 against exact search (as `build` does) on 200 queries,
then times 1000 other queries one at a time (the interactive latency) against the exact Flat index, and
reports the recall reached on those queries.

    .venv/bin/python benchmarks/bench_index.py [--vectors 200000] [--dim 64]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from pipelines import index as ix  # noqa: E402


def clustered(n: int, dim: int, rng: np.random.Generator, means: np.ndarray) -> np.ndarray:
    x = means[rng.integers(len(means), size=n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def latency_ms(index, queries: np.ndarray) -> float:
    started = time.perf_counter()
    for q in queries:
        index.search(q[None], 10)
    return 1000 * (time.perf_counter() - started) / len(queries)


def main() -> None:
    import faiss

    parser = argparse.ArgumentParser()
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    means = rng.normal(size=(256, args.dim)).astype(np.float32)
    corpus = clustered(args.vectors, args.dim, rng, means)
    tune_queries, test_queries = clustered(200, args.dim, rng, means), clustered(1000, args.dim, rng, means)
    started = time.perf_counter()
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(corpus)
    exact_build = time.perf_counter() - started
    exact_ms = latency_ms(exact, test_queries)
    rows = {}
    for kind in ("hnsw", "ivf_pq"):
        started = time.perf_counter()
        index, description, _ = ix._new_index(kind, corpus, seed=0)
        index.add(corpus)
        build_s = time.perf_counter() - started
        params, tuned_recall = ix.tune(index, kind, corpus, tune_queries, 0.95)
        rows[kind] = {"factory": description, "build_s": round(build_s, 2), "search_params": params,
                      "recall_at_10_tuning": round(tuned_recall, 4),
                      "recall_at_10_test": round(ix.recall_at(index, exact, test_queries), 4),
                      "query_ms": round(latency_ms(index, test_queries), 4),
                      "bytes_per_vector": round(faiss.serialize_index(index).size / args.vectors, 1)}
        rows[kind]["speedup_vs_exact"] = round(exact_ms / rows[kind]["query_ms"], 2)
        print(kind, rows[kind], flush=True)
    best = max(rows.values(), key=lambda r: r["speedup_vs_exact"])
    write_result("index", baseline={"what": "exact search (IndexFlatIP)", "query_ms": round(exact_ms, 4),
                                    "build_s": round(exact_build, 2), "bytes_per_vector": 4 * args.dim},
                 candidate={"what": "the fastest tuned index", **best}, ratio=exact_ms / best["query_ms"],
                 units="query latency speed-up over exact search (1 query at a time, k=10)",
                 goal="recall@10 >= 0.95 at the tuned parameters", extra={"vectors": args.vectors, "dim": args.dim,
                                                                          "indexes": rows})


if __name__ == "__main__":
    main()
