"""Uploads: files users send through the API (POST /uploads), checkpoints and dataset files that specs
name as upload:<id>.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24 04:10:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('uploads',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('owner', sa.String(length=200), nullable=True),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('filename', sa.String(length=200), nullable=False),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('checkpoint', 'dataset')", name=op.f('ck_uploads_kind')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_uploads'))
    )
    op.create_index(op.f('ix_uploads_owner'), 'uploads', ['owner'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_uploads_owner'), table_name='uploads')
    op.drop_table('uploads')
