"""Dangerous-capability evaluations and the release gate (suites, runners, paired
decisions, the checkpoint release state machine).

Must not import fastapi. Sits between gateway and policy/engine in the layering.
"""
