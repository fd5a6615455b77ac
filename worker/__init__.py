"""rootfs-export engine: pull -> cache -> flatten -> package.

The engine is a plain library: nothing under ``worker/`` except ``celery.py`` and
``tasks.py`` imports Celery, and nothing imports a database. The CLI and the Celery tasks
are thin shells over :func:`worker.export.export` and its stages.
"""
