"""Authorization decisions, API keys, limits and (later) quotas and screening.

Must not import fastapi or engine; decisions are plain functions over the database
session and the principal, raising `policy.errors` exceptions that the gateway maps to
HTTP in one place.
"""
