"""contrastive.eval: zero-shot classification, retrieval, FAISS indexes, embedding arithmetic, the search service.

The folder sits at the top of the repository and installs as `contrastive.eval` (pyproject's package-dir), so no
top-level `eval` package lands in site-packages, and a user's own `eval/` folder cannot shadow it.
"""
