"""Alembic environment of the regionsearch schema (shipped inside the package; see README)."""
