"""The FastIF HTTP API (FastAPI). Never imports torch, faiss, transformers, fastif or workers."""
