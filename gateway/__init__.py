"""The HTTP face of loragate: app factory, settings, Tinker `/api/v1/*` routes, auth,
the admission pipeline, error → HTTP mapping, and the CLI.

Must not contain business rules that belong to policy, engine or audit, and must not
import torch/transformers at module level (the API starts fast; the worker loads models).
"""
