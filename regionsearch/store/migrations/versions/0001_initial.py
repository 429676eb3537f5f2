"""initial schema: images, regions, manifest

Revision ID: 0001
Revises:
Create Date: 2025-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 64-bit ids (FAISS ids are int64); SQLite assigns ids only to ``INTEGER PRIMARY KEY``.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("path", sa.String(4096), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("mtime", sa.Float(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("indexed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.current_timestamp(),
        ),
        sa.PrimaryKeyConstraint("id", name="pk_images"),
        sa.UniqueConstraint("path", name="uq_images_path"),
        sa.CheckConstraint(
            "status IN ('pending', 'indexed', 'failed', 'deleted')",
            name=op.f("ck_images_status_valid"),
        ),
    )
    op.create_index("ix_images_content_hash", "images", ["content_hash"])
    op.create_index("ix_images_status", "images", ["status"])

    op.create_table(
        "regions",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("image_id", ID, nullable=False),
        sa.Column("rle", sa.JSON(), nullable=False),
        sa.Column("bbox_x", sa.Float(), nullable=False),
        sa.Column("bbox_y", sa.Float(), nullable=False),
        sa.Column("bbox_w", sa.Float(), nullable=False),
        sa.Column("bbox_h", sa.Float(), nullable=False),
        sa.Column("area", sa.Float(), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("source_score", sa.Float(), nullable=True),
        sa.Column("category", sa.String(255), nullable=True),
        sa.Column("external_id", sa.String(255), nullable=True),
        sa.Column("embedder", sa.String(255), nullable=False),
        sa.Column("vector_state", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("deleted", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.current_timestamp(),
        ),
        sa.PrimaryKeyConstraint("id", name="pk_regions"),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name="fk_regions_image_id_images",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(
            "vector_state IN ('pending', 'committed', 'missing')",
            name=op.f("ck_regions_vector_state_valid"),
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_regions_image_id", "regions", ["image_id"])
    op.create_index("ix_regions_vector_state_deleted", "regions", ["vector_state", "deleted"])

    op.create_table(
        "manifest",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("embedder", sa.String(255), nullable=False),
        sa.Column("dimension", sa.Integer(), nullable=False),
        sa.Column("metric", sa.String(16), nullable=False, server_default="ip"),
        sa.Column("factory", sa.String(255), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("image_root", sa.String(4096), nullable=True),
        sa.Column("n_images", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("n_regions", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("n_vectors", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("extra", sa.JSON(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.current_timestamp(),
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.current_timestamp(),
        ),
        sa.PrimaryKeyConstraint("id", name="pk_manifest"),
    )


def downgrade() -> None:
    op.drop_table("manifest")
    op.drop_index("ix_regions_vector_state_deleted", table_name="regions")
    op.drop_index("ix_regions_image_id", table_name="regions")
    op.drop_table("regions")
    op.drop_index("ix_images_status", table_name="images")
    op.drop_index("ix_images_content_hash", table_name="images")
    op.drop_table("images")
