"""Authorization decisions, API keys, scopes, limits, quotas, weight lineage, the release
policy and screening.

Must not import fastapi or engine; decisions are plain functions over the database
session and the principal, raising `policy.errors` exceptions that the gateway maps to
HTTP in one place.
"""
