"""FAISS index over embeddings: chosen and tuned on the data it holds, saved with its parameters.

Exact inner-product search (IndexFlatIP) up to `EXACT_MAX` vectors. Above it an IVF index (IVF-Flat, or IVF-PQ
when the raw vectors would pass a memory budget) is built without a held-out sample of the vectors, its nprobe
tuned until recall@k against exact search on those held-out queries reaches the target, and both are timed on
them; the automatic choice keeps the IVF index only when it meets the target at `MIN_SPEEDUP` times exact
search's queries/s, else it falls back to exact search (near-uniform data, where no IVF setting is both right
and fast). The held-out vectors are added once tuning is done. On a machine where faiss sees a GPU the index is moved there with
`index_cpu_to_gpu` (never HNSW, which faiss's GPU code does not run). Everything goes through faiss's standard
API, so an index written here opens in any faiss program.

Letters in names: N indexed vectors, Q queries, D embedding dim, K results per query.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from contrastive.errors import UserError
from contrastive.eval.gpu import gpu_available, move_to_gpu, to_gpu

INDEX_FILE = "image.index"
PARAMS_FILE = "index.json"
# `contrastive index --text`: the captions' embeddings indexed the same way, so an image query can return captions.
TEXT_INDEX_FILE = "text.index"
TEXT_PARAMS_FILE = "text_index.json"
EXACT_MAX = 20_000
# The automatic choice keeps an approximate index only when it answers the held-out queries at least this many
# times faster than exact search: below that the exact answers are worth more than the time saved.
MIN_SPEEDUP = 2.0
# Sub-quantizer counts that faiss's GPU IVF-PQ supports; we only pick among these so an index moves to the GPU.
GPU_PQ_SUBQUANTIZERS = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
KINDS = ("auto", "flat", "ivf_flat", "ivf_pq")


@dataclass
class IndexSpec:
    """Which index to build. kind: flat | ivf_flat | ivf_pq; nlist inverted lists; m PQ sub-quantizers."""

    kind: str
    nlist: int = 0
    m: int = 0

    def factory(self) -> str:
        if self.kind == "flat":
            return "Flat"
        if self.kind == "ivf_flat":
            return f"IVF{self.nlist},Flat"
        return f"IVF{self.nlist},PQ{self.m}x8"


@dataclass
class IndexParams:
    """What is saved beside the index (index.json); `nprobe` is applied again on load."""

    type: str
    factory: str
    dim: int
    count: int
    metric: str = "inner_product"
    nlist: int = 0
    m: int = 0
    nprobe: int = 0
    recall_k: int = 10
    target_recall: float = 0.0
    measured_recall: float | None = None
    tuning: list = field(default_factory=list)
    build_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    # How the index was chosen: held-out queries, each candidate's recall and queries/s on them, the reason.
    choice: dict = field(default_factory=dict)


def default_nlist(num_vectors: int) -> int:
    """The power of two nearest 4*sqrt(N) (faiss's guideline is 4..16 sqrt(N)), with >= 39 points per list."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(num_vectors))))
    while nlist > 1 and num_vectors < 39 * nlist:
        nlist //= 2
    return max(1, nlist)


def pq_subquantizers(dim: int) -> int:
    """The most sub-quantizers the GPU supports that split `dim` into pieces of at least 4 dimensions."""
    fitting = [m for m in GPU_PQ_SUBQUANTIZERS if dim % m == 0 and dim // m >= 4]
    if not fitting:
        raise UserError(f"no IVF-PQ layout for dimension {dim}; use --index-type flat or ivf_flat")
    return max(fitting)


def choose_spec(num_vectors: int, dim: int, *, kind: str = "auto", exact_max: int = EXACT_MAX,
                max_flat_bytes: float = 16 * 2**30, nlist: int = 0) -> IndexSpec:
    """Exact under `exact_max` vectors; IVF-Flat above while N*D float32 fits `max_flat_bytes`, else IVF-PQ."""
    if kind not in KINDS:
        raise UserError(f"unknown index type {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "auto":
        if num_vectors <= exact_max:
            kind = "flat"
        else:
            kind = "ivf_flat" if num_vectors * dim * 4 <= max_flat_bytes else "ivf_pq"
    if kind == "flat":
        return IndexSpec("flat")
    nlist = nlist or default_nlist(num_vectors)
    if num_vectors < nlist:
        raise UserError(f"an IVF index with {nlist} lists needs at least {nlist} vectors, got {num_vectors}")
    return IndexSpec(kind, nlist=nlist, m=pq_subquantizers(dim) if kind == "ivf_pq" else 0)


# ---------------------------------------------------------------- GPU

def to_cpu(index):
    import faiss

    if gpu_available() and "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index


def set_nprobe(index, nprobe: int) -> None:
    """nprobe on a CPU or GPU IVF index (a no-op on a flat one)."""
    import faiss

    if nprobe <= 0:
        return
    if "Gpu" in type(index).__name__:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    elif faiss.try_extract_index_ivf(index) is not None:
        faiss.extract_index_ivf(index).nprobe = nprobe


# ---------------------------------------------------------------- build and tune

def _train_ivf_cpu(index, train_ND: np.ndarray, spec: IndexSpec, *, seed: int) -> None:
    """Train the coarse quantizer (two-level k-means for many lists, as faiss.contrib offers) and the PQ."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    if spec.nlist >= 1024:
        from faiss.contrib.clustering import two_level_clustering

        # One level of k-means over nlist centroids costs N*nlist*D per iteration; two levels cost ~sqrt(nlist) less.
        centroids, _ = two_level_clustering(train_ND, int(math.sqrt(spec.nlist)), spec.nlist, spherical=True,
                                            seed=seed)
        faiss.normalize_L2(centroids)
        ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
        ivf.quantizer.is_trained = True
    index.train(train_ND)  # skips the quantizer once it holds nlist centroids; trains PQ for IVF-PQ


def _add(index, vectors_ND: np.ndarray, add_batch: int, held_out_N: np.ndarray | None = None) -> None:
    """Add the rows (all, or those not marked in held_out_N, under their row numbers as ids) block by block, so
    no second copy of the collection is made."""
    for start in range(0, len(vectors_ND), add_batch):
        block = vectors_ND[start:start + add_batch]
        if held_out_N is None:
            index.add(np.ascontiguousarray(block, dtype=np.float32))
            continue
        keep = ~held_out_N[start:start + len(block)]
        index.add_with_ids(np.ascontiguousarray(block[keep], dtype=np.float32),
                           np.arange(start, start + len(block), dtype=np.int64)[keep])


def build_index(vectors_ND: np.ndarray, spec: IndexSpec, *, seed: int = 0, add_batch: int = 262_144,
                use_gpu: bool = True, held_out_N: np.ndarray | None = None):
    """A trained, filled faiss index for `vectors_ND` (float32, L2-normalised rows); on the GPU if there is one.

    held_out_N (IVF only): a bool mask of rows left out of training and of the index, to be tuned on as queries
    the index does not hold and added afterwards (`add_held_out`); ids are row numbers either way.
    """
    import faiss

    num, dim = vectors_ND.shape
    assert held_out_N is None or spec.kind != "flat", "a flat index needs no held-out tuning"
    index = faiss.index_factory(dim, spec.factory(), faiss.METRIC_INNER_PRODUCT)
    train_ND = None
    if spec.kind != "flat":
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.seed = seed
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False  # the factory turns it on; it costs minutes and we never use it
        rng = np.random.default_rng(seed)
        trainable = np.arange(num) if held_out_N is None else np.flatnonzero(~held_out_N)
        num_train = min(len(trainable), max(64 * spec.nlist, 2**16))
        sample = (np.sort(rng.choice(trainable, size=num_train, replace=False)) if num_train < len(trainable)
                  else trainable)
        train_ND = np.ascontiguousarray(vectors_ND[sample], dtype=np.float32)
    if use_gpu and gpu_available():
        gpu_index = to_gpu(index)
        if gpu_index is not index:
            try:
                if train_ND is not None:
                    gpu_index.train(train_ND)
                _add(gpu_index, vectors_ND, add_batch, held_out_N)
                return gpu_index
            except Exception as e:
                print(f"faiss: building on the CPU instead ({type(e).__name__}: {str(e).splitlines()[0]})")
    if train_ND is not None:
        _train_ivf_cpu(index, train_ND, spec, seed=seed)
    _add(index, vectors_ND, add_batch, held_out_N)
    return index


def add_held_out(index, vectors_ND: np.ndarray, held_out_N: np.ndarray) -> None:
    """Add the rows build_index held out, under their row numbers, so the index holds every vector."""
    ids = np.flatnonzero(held_out_N).astype(np.int64)
    index.add_with_ids(np.ascontiguousarray(vectors_ND[ids], dtype=np.float32), ids)


def exact_knn(queries_QD: np.ndarray, base_ND: np.ndarray, k: int, *, chunk: int = 4096):
    """Exact inner-product top-k (faiss.knn, blocked over queries so memory stays O(chunk * N) at most)."""
    import faiss

    results_D, results_I = [], []
    for start in range(0, len(queries_QD), chunk):
        D, I = faiss.knn(np.ascontiguousarray(queries_QD[start:start + chunk], dtype=np.float32), base_ND, k,
                         metric=faiss.METRIC_INNER_PRODUCT)
        results_D.append(D)
        results_I.append(I)
    return np.concatenate(results_D), np.concatenate(results_I)


def search_excluding(index, queries_QD: np.ndarray, k: int, exclude_Q: np.ndarray | None = None):
    """Top-k (scores_QK, ids_QK) with id `exclude_Q[q]` (-1: none) dropped from query q's results.

    Missing results (an IVF probe that found fewer than k) are id -1 with score -inf.
    """
    D, I = index.search(np.ascontiguousarray(queries_QD, dtype=np.float32), k + (exclude_Q is not None))
    if exclude_Q is None:
        return D, I
    keep = _keep_mask(I, exclude_Q)
    shape = (len(I), k)
    return D[keep].reshape(shape), I[keep].reshape(shape)


def _keep_mask(I_QK1: np.ndarray, exclude_Q) -> np.ndarray:
    """Drop the excluded id where it appears in a row, else the row's last (k+1-th) result."""
    exclude_Q = np.asarray(exclude_Q)[:, None]
    keep = ~((I_QK1 == exclude_Q) & (exclude_Q >= 0))
    keep[keep.all(axis=1), -1] = False
    return keep


def per_query_recall(approx_I_QK: np.ndarray, exact_I_QK: np.ndarray) -> np.ndarray:
    """|approx top-k ∩ exact top-k| / k for each query."""
    k = exact_I_QK.shape[1]
    return np.array([len(set(a[a >= 0]) & set(e)) / k for a, e in zip(approx_I_QK, exact_I_QK)])


def knn_recall(approx_I_QK: np.ndarray, exact_I_QK: np.ndarray) -> float:
    """Mean |approx top-k ∩ exact top-k| / k (faiss's k-NN intersection measure)."""
    return float(per_query_recall(approx_I_QK, exact_I_QK).mean())


def tune_nprobe(index, base_ND: np.ndarray, query_sets: dict, *, nlist: int, k: int = 10,
                target: float = 0.95, absent_N: np.ndarray | None = None, min_qps: float = 0.0) -> dict:
    """Smallest nprobe whose recall@k against exact search reaches `target` on every query set, with 95%
    confidence: the mean over the sample minus 1.96 standard errors must reach it, so that queries the tuning
    never saw reach it too. Doubles nprobe from 1 until it passes, then bisects between the last failing and
    the first passing value (to within an eighth).

    query_sets: {name: (queries_QD, exclude_Q or None)}; a query drawn from the base excludes itself (its own
    id), so recall is measured on true neighbours, not on finding the query. absent_N: rows of base_ND the index
    does not hold (held-out queries), left out of the exact reference. min_qps: stop once an nprobe answers
    slower than this (a larger one is slower still). Returns {"nprobe", "recall", "passes", "tuning":
    [{"nprobe", "recall": {name: r}, "recall_lower": {name: r}, "qps"}]}; when no nprobe reaches the target,
    the best one.
    """
    truth = {name: search_excluding_exact(base_ND, q, k, ex, absent_N=absent_N)
             for name, (q, ex) in query_sets.items()}
    table = []

    def measure(nprobe: int) -> dict:
        set_nprobe(index, nprobe)
        recalls, lower, seconds, num_queries = {}, {}, 0.0, 0
        for name, (queries, exclude) in query_sets.items():
            start = time.perf_counter()
            _, I = search_excluding(index, queries, k, exclude)
            seconds += time.perf_counter() - start
            num_queries += len(queries)
            per_query = per_query_recall(I, truth[name])
            recalls[name] = float(per_query.mean())
            lower[name] = recalls[name] - 1.96 * float(per_query.std()) / math.sqrt(len(per_query))
        row = {"nprobe": nprobe, "recall": recalls, "recall_lower": lower, "qps": num_queries / max(seconds, 1e-9)}
        row["passes"] = min(lower.values()) >= target or min(recalls.values()) >= 1.0
        table.append(row)
        return row

    best, passing, failing, stalled, nprobe = None, None, 0, 0, 1
    # Stop doubling at the target, at nlist (exhaustive), or when two doublings in a row gain nothing (an
    # IVF-PQ index plateaus at what its codes can resolve).
    while nprobe <= nlist and stalled < 2:
        row = measure(nprobe)
        if best is None or min(row["recall"].values()) > min(best["recall"].values()) + 1e-3:
            best, stalled = row, 0
        else:
            stalled += 1
        if row["passes"]:
            passing = row
            break
        failing = nprobe
        if row["qps"] < min_qps:
            break
        nprobe *= 2
    if passing is not None:
        while passing["nprobe"] - failing > max(1, passing["nprobe"] // 8):
            row = measure((failing + passing["nprobe"]) // 2)
            if row["passes"]:
                passing = row
            else:
                failing = row["nprobe"]
        best = passing
    table.sort(key=lambda r: r["nprobe"])
    set_nprobe(index, best["nprobe"])
    return {"nprobe": best["nprobe"], "recall": min(best["recall"].values()), "passes": best["passes"],
            "tuning": table}


def search_excluding_exact(base_ND: np.ndarray, queries_QD: np.ndarray, k: int, exclude_Q=None, *,
                           absent_N: np.ndarray | None = None) -> np.ndarray:
    """Exact top-k ids with the excluded id dropped (reference for tuning); with absent_N (a bool mask over the
    rows), over the rows the index holds only: the first k present ids of a deeper exact search, deepened until
    every query has k of them."""
    if absent_N is None or not absent_N.any():
        _, I = exact_knn(queries_QD, base_ND, k + (exclude_Q is not None))
        if exclude_Q is None:
            return I
        return I[_keep_mask(I, exclude_Q)].reshape(len(I), k)
    depth = k + 16
    while True:
        depth = min(depth, len(base_ND))
        _, I = exact_knn(queries_QD, base_ND, depth)
        keep = ~absent_N[I]
        if exclude_Q is not None:
            keep &= I != np.asarray(exclude_Q)[:, None]
        if (keep.sum(axis=1) >= k).all() or depth == len(base_ND):
            break
        depth *= 4
    assert (keep.sum(axis=1) >= k).all(), "fewer than k vectors are present"
    first_present = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # present ids first, in rank order
    return np.take_along_axis(I, first_present, axis=1)


def _qps(search, queries_QD: np.ndarray) -> float:
    """Queries per second of one search call over all of queries_QD."""
    start = time.perf_counter()
    search(queries_QD)
    return len(queries_QD) / max(time.perf_counter() - start, 1e-9)


def build_tuned_index(vectors_ND: np.ndarray, *, kind: str = "auto", exact_max: int = EXACT_MAX,
                      max_flat_bytes: float = 16 * 2**30, nlist: int = 0, target_recall: float = 0.95,
                      recall_k: int = 10, num_tune_queries: int = 1000, extra_queries_QD: np.ndarray | None = None,
                      seed: int = 0, use_gpu: bool = True, min_speedup: float = MIN_SPEEDUP,
                      timing_repeats: int = 3):
    """Choose, build and (for IVF) tune an index over vectors_ND (float32, unit rows). Returns (index, IndexParams).

    IVF: `num_tune_queries` of the vectors (at most a tenth) are held out of the index, nprobe is tuned on them
    as queries the index does not hold (and on as many of `extra_queries_QD`, e.g. text embeddings, the other
    side of text->image search), then they are added. The IVF index and exact search are timed on the held-out
    queries (interleaved, best of `timing_repeats`). kind "auto" keeps the IVF index only when it meets the
    target at >= `min_speedup` times exact search's queries/s, and otherwise falls back to exact search, unless
    the vectors pass `max_flat_bytes` (IVF-PQ then stays, below target if need be). `params.choice` records
    the candidates measured and the reason.
    """
    start = time.perf_counter()
    num, dim = vectors_ND.shape
    spec = choose_spec(num, dim, kind=kind, exact_max=exact_max, max_flat_bytes=max_flat_bytes, nlist=nlist)
    params = IndexParams(type=spec.kind, factory=spec.factory(), dim=dim, count=num, nlist=spec.nlist, m=spec.m,
                         recall_k=recall_k, target_recall=target_recall)
    if spec.kind == "flat":
        index = build_index(vectors_ND, spec, seed=seed, use_gpu=use_gpu)
        params.measured_recall = 1.0
        params.choice = {"chosen": "Flat", "reason": (f"{num} vectors, at most exact_max {exact_max}"
                                                      if kind == "auto" else "asked for")}
        params.build_seconds = round(time.perf_counter() - start, 3)
        return index, params

    rng = np.random.default_rng(seed + 1)
    held_out_N = np.zeros(num, dtype=bool)
    held_out_N[rng.choice(num, size=max(1, min(num_tune_queries, num // 10)), replace=False)] = True
    index = build_index(vectors_ND, spec, seed=seed, use_gpu=use_gpu, held_out_N=held_out_N)
    queries_QD = np.ascontiguousarray(vectors_ND[held_out_N], dtype=np.float32)
    query_sets = {"held_out": (queries_QD, None)}
    if extra_queries_QD is not None and len(extra_queries_QD):
        extra = rng.choice(len(extra_queries_QD), size=min(num_tune_queries, len(extra_queries_QD)), replace=False)
        query_sets["extra"] = (extra_queries_QD[extra].astype(np.float32), None)

    # Exact search on the device the IVF index is on: a GPU flat index (which is also the fallback there), or
    # faiss.knn over the array itself on the CPU (the same kernel as IndexFlatIP, without copying the vectors).
    exact_index = None
    if "Gpu" in type(index).__name__:  # the GPU branch runs in bench/gpu_check.py and against tests' stand-in
        exact_index = build_index(vectors_ND, IndexSpec("flat"), use_gpu=True)
        exact_search = lambda q: exact_index.search(q, recall_k)  # noqa: E731
    else:
        exact_search = lambda q: exact_knn(q, vectors_ND, recall_k)  # noqa: E731
    can_fall_back = kind == "auto" and num * dim * 4 <= max_flat_bytes
    # A larger nprobe is only slower: once the IVF index is too slow to be kept, stop looking (with a factor-2
    # margin, as this is one timing of each).
    min_qps = min_speedup * _qps(exact_search, queries_QD) / 2 if can_fall_back else 0.0
    tuned = tune_nprobe(index, vectors_ND, query_sets, nlist=spec.nlist, k=recall_k, target=target_recall,
                        absent_N=held_out_N, min_qps=min_qps)
    params.nprobe, params.measured_recall, params.tuning = tuned["nprobe"], tuned["recall"], tuned["tuning"]
    qps_exact, qps_ivf = [], []
    for _ in range(timing_repeats):  # interleaved, so both see the same machine load
        qps_exact.append(_qps(exact_search, queries_QD))
        qps_ivf.append(_qps(lambda q: index.search(q, recall_k), queries_QD))
    speedup = max(qps_ivf) / max(qps_exact)
    row = next(r for r in tuned["tuning"] if r["nprobe"] == tuned["nprobe"])
    choice = {"held_out_queries": len(queries_QD),
              "extra_queries": len(query_sets["extra"][0]) if "extra" in query_sets else 0,
              "min_speedup": min_speedup,
              "candidates": [{"factory": "Flat", "recall": 1.0, "qps": round(max(qps_exact), 1)},
                             {"factory": spec.factory(), "nprobe": tuned["nprobe"],
                              "recall": round(tuned["recall"], 4),
                              "recall_lower": round(min(row["recall_lower"].values()), 4),
                              "qps": round(max(qps_ivf), 1), "speedup": round(speedup, 2)}]}
    meets = tuned["passes"]
    if can_fall_back and not (meets and speedup >= min_speedup):
        del index
        index = exact_index if exact_index is not None else build_index(vectors_ND, IndexSpec("flat"),
                                                                          use_gpu=use_gpu)
        why = (f"no nprobe measured reached recall@{recall_k} {target_recall} on the held-out queries (best: "
               f"{tuned['recall']:.3f} at nprobe {tuned['nprobe']}, {speedup:.2f}x exact search)" if not meets else
               f"at recall@{recall_k} {target_recall} it was only {speedup:.2f}x exact search (< {min_speedup}x)")
        params.type, params.factory, params.nlist, params.m, params.nprobe = "flat", "Flat", 0, 0, 0
        params.measured_recall = 1.0
        choice.update(chosen="Flat", reason=f"{spec.factory()}: {why}; exact search instead")
    else:
        add_held_out(index, vectors_ND, held_out_N)
        if kind != "auto":
            reason = "asked for"
        elif meets:
            reason = f"recall@{recall_k} >= {target_recall} on the held-out queries at {speedup:.1f}x exact search"
        else:
            reason = f"below the target, but {num * dim * 4 / 2**30:.1f} GiB of vectors pass the exact-search budget"
        choice.update(chosen=spec.factory(), reason=reason)
    params.choice = choice
    params.build_seconds = round(time.perf_counter() - start, 3)
    return index, params


# ---------------------------------------------------------------- save and load

def save_index(index, params: IndexParams, directory: str | Path, *, index_file: str = INDEX_FILE,
               params_file: str = PARAMS_FILE) -> Path:
    """Write the (CPU copy of the) index, then index.json: index.json last marks a complete directory."""
    import faiss

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (index_file + ".tmp")
    faiss.write_index(to_cpu(index), str(tmp))
    tmp.replace(directory / index_file)
    tmp_params = directory / (params_file + ".tmp")
    tmp_params.write_text(json.dumps(asdict(params), indent=2))
    tmp_params.replace(directory / params_file)
    return directory / index_file


def read_params(directory: str | Path, *, params_file: str = PARAMS_FILE) -> IndexParams:
    directory = Path(directory)
    path = directory / params_file
    if not directory.is_dir():
        raise UserError(f"index directory {directory} does not exist; build it with `contrastive index`")
    if not path.is_file():
        raise UserError(f"index directory {directory} is incomplete (no {params_file}); "
                        f"rebuild it with `contrastive index`")
    try:
        raw = json.loads(path.read_text())
        return IndexParams(**raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{path} is not a valid index parameter file ({e})") from None


def load_index(directory: str | Path, *, use_gpu: bool = True, index_file: str = INDEX_FILE,
               params_file: str = PARAMS_FILE):
    """(faiss index with its tuned nprobe, on the GPU when there is one; IndexParams)."""
    import faiss

    directory = Path(directory)
    params = read_params(directory, params_file=params_file)
    path = directory / index_file
    if not path.is_file():
        raise UserError(f"index directory {directory} is incomplete (no {index_file}); rebuild it")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise UserError(f"{path} cannot be read as a faiss index ({str(e).splitlines()[0]})") from None
    if index.d != params.dim or index.ntotal != params.count:
        raise UserError(f"{path} holds {index.ntotal} vectors of dimension {index.d}, but {params_file} says "
                        f"{params.count} of dimension {params.dim}; rebuild the index")
    if use_gpu:
        index = to_gpu(index)
    set_nprobe(index, params.nprobe)
    return index, params


# ---------------------------------------------------------------- index directories

def clear_index_dir(directory: Path, *, overwrite: bool) -> None:
    """Refuse to write over an existing index unless asked; then remove only what `contrastive index` wrote."""
    import shutil

    from contrastive.eval.embed import IMG_DIR, META_DIR, TEXT_DIR
    from contrastive.eval.image_store import LOCATIONS_FILE

    ours = [directory / name for name in (IMG_DIR, TEXT_DIR, META_DIR, INDEX_FILE, PARAMS_FILE, TEXT_INDEX_FILE,
                                          TEXT_PARAMS_FILE, LOCATIONS_FILE)]
    present = [p for p in ours if p.exists()]
    if present and not overwrite:
        raise UserError(f"{directory} already holds an index ({present[0].name}); pass --overwrite to replace it")
    for path in present:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def indexed_captions(bundle, meta, text_ND: np.ndarray, *, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(caption_MD, caption -> row) of every caption of each indexed row: its JSON's `captions` list, else its
    caption's lines (eval/captioned.py). The index holds one text embedding per row (of the sample's .txt), which
    serves as is when that is the row's only caption; otherwise the captions are encoded here."""
    from contrastive.eval.captioned import caption_list
    from contrastive.eval.retrieval import captions_of, encode_captions

    def listed(extra):  # eval/embed.py stores a JSON list as its JSON text
        try:
            return json.loads(extra) if isinstance(extra, str) else None
        except ValueError:
            return None

    extras = meta["captions"] if "captions" in meta.columns else [None] * len(meta)
    per_row = [caption_list(text, listed(extra)) for text, extra in zip(meta["caption"], extras)]
    if all(captions == [text] for captions, text in zip(per_row, meta["caption"])):
        return text_ND, np.arange(len(text_ND))
    flat, owner_M = captions_of(per_row)
    return encode_captions(bundle, flat, batch_size=batch_size), owner_M


def build_index_dir(*, model: str, data: str, out: str | Path, batch_size: int = 256, kind: str = "auto",
                    target_recall: float = 0.95, nlist: int = 0, max_flat_gb: float = 16.0,
                    exact_max: int = EXACT_MAX, overwrite: bool = False, seed: int = 0,
                    retrieval_metrics: bool = False, text_index: bool = False) -> IndexParams:
    """`contrastive index`: embed a shard set (clip-retrieval layout), build and tune a FAISS index beside it,
    record where each image lies in its shard (eval/image_store.py) and, with `text_index`, index the captions
    too (text.index, text_index.json)."""
    import faiss

    from contrastive.loading import load_for_inference
    from contrastive.data import expand_sources
    from contrastive.eval.embed import IMAGE_KEYS, read_embeddings, write_embeddings
    from contrastive.eval.image_store import LOCATIONS_FILE, record_locations

    if not 0 < target_recall <= 1:
        raise UserError(f"--target-recall must be in (0, 1], got {target_recall}")
    expand_sources(data)
    if not Path(model).exists():
        raise UserError(f"--model {model} does not exist")
    out = Path(out)
    clear_index_dir(out, overwrite=overwrite)
    bundle, info = load_for_inference(model)
    move_to_gpu(bundle)
    summary = write_embeddings(bundle, data, out, batch_size=batch_size)
    image_ND, text_ND, meta = read_embeddings(out)
    image_ND, text_ND = image_ND.astype(np.float32), text_ND.astype(np.float32)
    faiss.normalize_L2(image_ND)  # float16 storage leaves norms within ~1e-3 of 1
    faiss.normalize_L2(text_ND)
    print(f"building a FAISS index over {len(image_ND)} image embeddings of dimension {image_ND.shape[1]}")
    index, params = build_tuned_index(image_ND, kind=kind, exact_max=exact_max, nlist=nlist,
                                      max_flat_bytes=max_flat_gb * 2**30, target_recall=target_recall,
                                      extra_queries_QD=text_ND, seed=seed)
    params.extra = {"model": str(Path(model).resolve()), "model_checkpoint": info.get("checkpoint"),
                    "model_step": info.get("step"), "data": data, "embeddings": summary,
                    "gpu": gpu_available()}
    locations = record_locations(data, meta["image_path"].astype(str).tolist(),
                                 image_exts=tuple(IMAGE_KEYS.split(";")))
    locations.to_parquet(out / LOCATIONS_FILE, index=False)
    params.extra["image_locations"] = int((locations["offset"] >= 0).sum())
    if text_index:  # written before index.json, which marks the directory complete
        print(f"building a FAISS index over {len(text_ND)} caption embeddings")
        text, text_params = build_tuned_index(text_ND, kind=kind, exact_max=exact_max, nlist=nlist,
                                              max_flat_bytes=max_flat_gb * 2**30, target_recall=target_recall,
                                              extra_queries_QD=image_ND, seed=seed)
        text_params.extra = {"model": params.extra["model"], "data": data}
        save_index(text, text_params, out, index_file=TEXT_INDEX_FILE, params_file=TEXT_PARAMS_FILE)
        params.extra["text_index"] = {"type": text_params.type, "factory": text_params.factory,
                                      "nprobe": text_params.nprobe, "measured_recall": text_params.measured_recall}
    if retrieval_metrics:  # each image with every caption of it, exact and chunked (eval/retrieval.py)
        from contrastive.eval.retrieval import retrieval_recall

        params.extra["retrieval"] = retrieval_recall(image_ND, *indexed_captions(bundle, meta, text_ND,
                                                                                 batch_size=batch_size))
        (out / "retrieval.json").write_text(json.dumps(params.extra["retrieval"], indent=2))
    save_index(index, params, out)
    return params
