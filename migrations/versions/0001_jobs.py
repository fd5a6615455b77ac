"""exports, builds and build_tasks tables

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "builds",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(72), nullable=False),
        sa.Column("image", sa.String(1024), nullable=False),
        sa.Column("manifest_digest", sa.String(80), nullable=False),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("format", sa.String(8), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("resolved", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("phase", sa.String(16), nullable=True),
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("package_task_id", sa.String(64), nullable=True),
        sa.Column("task_ids", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.UniqueConstraint("key", name="uq_builds_key"),
    )
    op.create_index("ix_builds_status", "builds", ["status"])

    op.create_table(
        "exports",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("image", sa.String(1024), nullable=False),
        sa.Column("platform", sa.String(64), nullable=True),
        sa.Column("format", sa.String(8), nullable=False),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("phase", sa.String(16), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("manifest_digest", sa.String(80), nullable=True),
        sa.Column("build_id", sa.String(32), sa.ForeignKey("builds.id", name="fk_exports_build"),
                  nullable=True),
        sa.Column("reused", sa.Boolean(), nullable=False),
        sa.Column("resolve_task_id", sa.String(64), nullable=True),
        sa.Column("resolve_attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
    )
    op.create_index("ix_exports_status", "exports", ["status"])
    op.create_index("ix_exports_build_id", "exports", ["build_id"])
    op.create_index("ix_exports_created_at", "exports", ["created_at"])

    op.create_table(
        "build_tasks",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.Column("build_id", sa.String(32), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=True),
        sa.Column("digest", sa.String(80), nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
    )
    op.create_index("ix_build_tasks_job_id", "build_tasks", ["job_id"])
    op.create_index("ix_build_tasks_build_id", "build_tasks", ["build_id"])
    op.create_index("ix_build_tasks_state", "build_tasks", ["state"])
    op.create_index("ix_build_tasks_heartbeat_at", "build_tasks", ["heartbeat_at"])


def downgrade() -> None:
    op.drop_table("build_tasks")
    op.drop_table("exports")
    op.drop_table("builds")
