"""Celery entrypoint: the app, its tasks and the beat schedule. Tasks load by id and call core."""
