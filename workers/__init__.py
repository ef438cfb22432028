"""Celery workers: they run the engine (``fastif/``) for the jobs the API records in Redis."""
