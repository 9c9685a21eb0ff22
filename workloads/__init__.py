"""What runs on workers: the ML side of dask-ai-cluster (backends, LLM, embeddings)."""
