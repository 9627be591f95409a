"""GPU placement for evaluation: FAISS indexes and models, on the GPU when one is seen, else left on the CPU.

Its own module so that index.py and retrieval.py both build on it without importing each other.
"""
from __future__ import annotations

_gpu_resources: list = []  # StandardGpuResources must outlive every index that uses them


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees a GPU (faiss-cpu lacks the GPU symbols)."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def to_gpu(index):
    """Move an index to GPU 0 when faiss sees one; on any failure (or without a GPU) the CPU index is returned."""
    import faiss

    if not gpu_available():
        return index
    try:
        res = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        ivf = faiss.try_extract_index_ivf(index)
        # For IVF-PQ useFloat16 means float16 lookup tables, which the GPU needs past 48 bytes per code; for
        # IVF-Flat it would mean float16 storage, so it stays off there.
        options.useFloat16 = ivf is not None and "PQ" in type(faiss.downcast_index(ivf)).__name__
        gpu_index = faiss.index_cpu_to_gpu(res, 0, index, options)
    except Exception as e:  # e.g. an index type the GPU does not run
        print(f"faiss: keeping the index on the CPU ({type(e).__name__}: {e})")
        return index
    _gpu_resources.append(res)
    return gpu_index


def move_to_gpu(bundle) -> None:
    """Embed on the GPU when torch sees one."""
    import torch

    if torch.cuda.is_available():
        bundle.model.cuda()
