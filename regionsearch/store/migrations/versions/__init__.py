"""Alembic revisions (files named ``NNNN_slug.py``; revision ids are the ``NNNN`` numbers)."""
