"""FAISS index choice, nprobe tuning against exact search, and save / reload / query round trips."""
import json
import sys

import numpy as np
import pytest

from contrastive.errors import UserError
from contrastive.eval.index import (IndexSpec, build_tuned_index, choose_spec, default_nlist, exact_knn, knn_recall,
                        load_index, save_index, search_excluding, set_nprobe)


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    """faiss's OpenMP threads spin; on a shared 2-core machine one thread is faster and steadier."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(num: int, dim: int, *, num_clusters: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_clusters, dim)).astype(np.float32)
    x = centres[rng.integers(num_clusters, size=num)] + noise * rng.normal(size=(num, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_index_type_follows_size():
    assert choose_spec(20_000, 512).kind == "flat" and choose_spec(20_001, 512).kind == "ivf_flat"
    spec = choose_spec(1_000_000, 512)
    assert spec == IndexSpec("ivf_flat", nlist=4096) and spec.factory() == "IVF4096,Flat"
    pq = choose_spec(1_000_000, 512, max_flat_bytes=1e9)
    assert pq.kind == "ivf_pq" and 512 % pq.m == 0 and pq.factory() == f"IVF4096,PQ{pq.m}x8"
    assert default_nlist(200_000) == 2048 and default_nlist(100) == 2  # >= 39 points per list
    with pytest.raises(UserError, match="unknown index type"):
        choose_spec(10, 4, kind="hnsw")


def test_tuned_ivf_reaches_the_target_on_fresh_queries():
    base = clustered(12_000, 32, num_clusters=60, noise=0.6, seed=0)
    index, params = build_tuned_index(base, kind="ivf_flat", nlist=64, target_recall=0.95, num_tune_queries=300)
    assert params.type == "ivf_flat" and params.nlist == 64 and params.measured_recall >= 0.95
    # The smallest nprobe measured whose recall reaches the target with 95% confidence.
    chosen = [r for r in params.tuning if r["nprobe"] == params.nprobe]
    assert len(chosen) == 1 and min(chosen[0]["recall_lower"].values()) >= 0.95
    assert all(min(r["recall_lower"].values()) < 0.95 for r in params.tuning if r["nprobe"] < params.nprobe)
    # Checked on queries the tuning never saw, against exact search computed here.
    fresh = clustered(12_500, 32, num_clusters=60, noise=0.6, seed=0)[12_000:]
    _, approx = index.search(fresh, 10)
    _, exact = exact_knn(fresh, base, 10)
    assert knn_recall(approx, exact) >= 0.95


def uniform(num: int, dim: int, *, seed: int) -> np.ndarray:
    """Unit vectors uniform on the sphere: no clusters for an IVF index to exploit, the hard case."""
    x = np.random.default_rng(seed).normal(size=(num, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_auto_choice_meets_the_target_on_held_out_queries_of_uniform_vectors():
    """The automatic choice tunes on vectors it holds out of the index; fresh queries then reach the target.
    min_speedup 0 keeps the IVF index whatever the timing, so the test checks the tuning, not this machine."""
    base = uniform(20_000, 16, seed=5)
    index, params = build_tuned_index(base, exact_max=10_000, nlist=128, num_tune_queries=500, min_speedup=0.0)
    assert params.type == "ivf_flat" and params.choice["chosen"] == "IVF128,Flat" and index.ntotal == 20_000
    assert params.choice["held_out_queries"] == 500 and params.measured_recall >= 0.95
    fresh = uniform(1_000, 16, seed=6)
    _, exact = exact_knn(fresh, base, 10)
    _, approx = index.search(fresh, 10)
    assert knn_recall(approx, exact) >= 0.95
    # Tuning is what gets it there: on these vectors the untuned nprobe finds well under half.
    set_nprobe(index, 1)
    assert knn_recall(index.search(fresh, 10)[1], exact) < 0.5
    # The held-out vectors were added back under their own row numbers.
    _, top1 = index.search(base, 1)
    assert (top1[:, 0] == np.arange(20_000)).all()


def test_auto_choice_falls_back_to_exact_search_unless_memory_forbids_it():
    base = uniform(20_000, 16, seed=5)
    index, params = build_tuned_index(base, exact_max=10_000, nlist=128, num_tune_queries=500, min_speedup=1e9)
    assert params.type == "flat" and params.nprobe == 0 and params.measured_recall == 1.0
    import faiss

    assert type(index) is faiss.IndexFlat and index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert index.ntotal == 20_000
    assert params.choice["chosen"] == "Flat" and "exact search instead" in params.choice["reason"]
    assert [c["factory"] for c in params.choice["candidates"]] == ["Flat", "IVF128,Flat"]
    assert len(params.tuning) == 1  # tuning stops at the first nprobe too slow to be kept
    # Past the memory budget for raw vectors there is no exact fallback: the IVF-PQ index stays.
    pq, pq_params = build_tuned_index(base, exact_max=10_000, nlist=64, max_flat_bytes=1e5, num_tune_queries=200,
                                      min_speedup=1e9)
    assert pq_params.type == "ivf_pq" and pq.ntotal == 20_000 and pq_params.choice["chosen"].startswith("IVF64,PQ")


def test_exact_reference_leaves_out_rows_the_index_does_not_hold():
    from contrastive.eval.index import search_excluding_exact

    base = uniform(3_000, 8, seed=7)
    absent = np.zeros(3_000, dtype=bool)
    absent[np.random.default_rng(0).choice(3_000, 600, replace=False)] = True
    queries = base[absent][:100]
    # Reference: exact search over the present rows only, mapped back to row numbers.
    present = np.flatnonzero(~absent)
    _, I = exact_knn(queries, base[present], 10)
    assert (search_excluding_exact(base, queries, 10, absent_N=absent) == present[I]).all()


def test_search_excluding_drops_only_the_given_id():
    base = clustered(500, 16, num_clusters=5, noise=0.5, seed=1)
    index, _ = build_tuned_index(base, kind="flat")
    D, I = search_excluding(index, base[:20], 5, np.arange(20))
    assert I.shape == (20, 5) and not (I == np.arange(20)[:, None]).any()
    D_all, I_all = index.search(base[:20], 6)
    assert (I == I_all[:, 1:]).all()  # each vector is its own nearest neighbour; the rest keep their order
    _, I_none = search_excluding(index, base[:3], 5, np.full(3, -1))
    assert (I_none == I_all[:3, :5]).all()


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq"])
def test_saved_index_reloads_and_gives_the_same_results(tmp_path, kind):
    base = clustered(4_000, 32, num_clusters=20, noise=0.5, seed=2)
    index, params = build_tuned_index(base, kind=kind, nlist=16, num_tune_queries=200)
    queries = clustered(4_100, 32, num_clusters=20, noise=0.5, seed=2)[4_000:]
    D, I = index.search(queries, 10)
    save_index(index, params, tmp_path)
    saved = json.loads((tmp_path / "index.json").read_text())
    assert saved["dim"] == 32 and saved["count"] == 4_000 and saved["nprobe"] == params.nprobe
    assert saved["metric"] == "inner_product" and saved["type"] == kind
    loaded, loaded_params = load_index(tmp_path)
    D2, I2 = loaded.search(queries, 10)
    assert (I2 == I).all() and np.array_equal(D2, D)
    assert loaded_params == params


def test_missing_or_partial_index_directories(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_index(tmp_path / "nope")
    with pytest.raises(UserError, match="incomplete"):
        load_index(tmp_path)  # an empty folder: no index.json
    base = clustered(300, 8, num_clusters=3, noise=0.5, seed=3)
    index, params = build_tuned_index(base, kind="flat")
    save_index(index, params, tmp_path)
    (tmp_path / "image.index").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot be read as a faiss index"):
        load_index(tmp_path)
    (tmp_path / "image.index").unlink()
    with pytest.raises(UserError, match="incomplete"):
        load_index(tmp_path)


def test_benchmark_script_runs_small(tmp_path, capsys, monkeypatch):
    """bench/faiss_index.py at a small size, so the script does not rot between full runs."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_faiss_index", REPO / "bench" / "faiss_index.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--kinds", "clustered,uniform", "--num-vectors", "8000", "--dim", "32", "--num-queries",
                       "200", "--index-type", "ivf_flat", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["kind"] for r in result["kinds"]] == ["clustered", "uniform"]
    for r in result["kinds"]:
        assert r["index"].startswith("IVF") and r["num_vectors"] == 8000 and r["num_queries"] == 200
        assert r["cpu"]["recall@10"] >= 0.9 and r["cpu"]["qps_exact"] > 0 and r["cpu"]["qps_chosen"] > 0
    assert "| uniform | 8,000 x 32 | IVF" in capsys.readouterr().out


class _FakeGpu:
    """Stands in for faiss's GPU API on a machine without one: "GPU" indexes wrap CPU ones."""

    def __init__(self, fail: bool = False):
        self.fail, self.options = fail, []

    def install(self, monkeypatch):
        import faiss

        fake = self

        class GpuIndexFake:
            def __init__(self, index):
                self.index = index

            def __getattr__(self, name):
                return getattr(self.index, name)

        class GpuClonerOptions:
            useFloat16 = False

        def index_cpu_to_gpu(res, device, index, options=None):
            fake.options.append(options.useFloat16)
            if fake.fail:
                raise RuntimeError("not supported on the GPU")
            return GpuIndexFake(faiss.clone_index(index))

        monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
        monkeypatch.setattr(faiss, "GpuClonerOptions", GpuClonerOptions, raising=False)
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", index_cpu_to_gpu, raising=False)
        monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: index.index, raising=False)
        monkeypatch.setattr(faiss, "GpuParameterSpace", faiss.ParameterSpace, raising=False)
        return GpuIndexFake


def test_gpu_path_moves_indexes_and_falls_back_to_the_cpu(monkeypatch, tmp_path):
    """Without a GPU here, the GPU code path runs against a stand-in: IVF indexes go through index_cpu_to_gpu
    (float16 lookup tables for IVF-PQ only), save as CPU indexes, and a refusal keeps the CPU index."""
    from contrastive.eval.index import gpu_available, to_gpu

    fake = _FakeGpu()
    gpu_type = fake.install(monkeypatch)
    assert gpu_available()
    base = clustered(3_000, 16, num_clusters=10, noise=0.5, seed=4)
    index, params = build_tuned_index(base, kind="ivf_flat", nlist=8, num_tune_queries=100)
    # Two moves: the IVF index, and the flat index exact search is timed against on the same device.
    assert isinstance(index, gpu_type) and index.ntotal == 3_000 and fake.options == [False, False]
    save_index(index, params, tmp_path)  # written through index_gpu_to_cpu
    loaded, _ = load_index(tmp_path)
    import faiss

    assert isinstance(loaded, gpu_type) and faiss.extract_index_ivf(loaded.index).nprobe == params.nprobe
    moved = len(fake.options)
    pq, _ = build_tuned_index(base, kind="ivf_pq", nlist=8, num_tune_queries=100)
    assert fake.options[moved:] == [True, False]  # float16 tables for the IVF-PQ index, not for the flat one
    fake.fail = True
    cpu = build_tuned_index(base, kind="flat")[0]
    assert to_gpu(cpu) is cpu
