"""State in SQL: engine/session setup, ORM models, the append-only hash-chained audit log
and its verification.

The bottom layer: must not import any other loragate package (gateway, policy, engine,
evals). The schema itself is written only by Alembic (`migrations/`).
"""
