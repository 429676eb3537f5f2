"""images: the span of each image's live region ids (image filters without GROUP BY)

An image filter used to aggregate ``min(id), max(id), count(*)`` of live regions per image
(migration 0002), ~30 us per image named: 3 s for half the images of a 10M-region index. The
span now lives on the image row, written with its regions (store/regions.py), so a filter reads
one row per image and no region at all. ``live_regions == region_id_end - region_id_start``
says the span is exact (the usual case: one writer inserts an image's regions together).

The upgrade backfills the columns from the regions table (one indexed look-up per image through
``ix_regions_image_live``), so existing indexes keep filtering correctly.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# ``deleted = false`` (not ``NOT deleted``): an equality, so SQLite seeks (image_id, deleted)
# in the index and min/max are one look-up each
_LIVE = "FROM regions r WHERE r.image_id = images.id AND r.deleted = false"

BACKFILL = f"""
UPDATE images SET
    region_id_start = (SELECT min(r.id) {_LIVE}),
    region_id_end = (SELECT max(r.id) + 1 {_LIVE}),
    live_regions = (SELECT count(*) {_LIVE})
"""


def upgrade() -> None:
    op.add_column("images", sa.Column("region_id_start", sa.BigInteger(), nullable=True))
    op.add_column("images", sa.Column("region_id_end", sa.BigInteger(), nullable=True))
    op.add_column(
        "images",
        sa.Column("live_regions", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.execute(BACKFILL)


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("live_regions")
        batch.drop_column("region_id_end")
        batch.drop_column("region_id_start")
