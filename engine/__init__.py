"""Model execution: registry of local base models, the Backend (torch + peft), losses,
sampling, adapter checkpoints and the worker loop that drains the futures queue.

Must not import fastapi, gateway or policy; keeps torch out of the import path of
`engine.backend`, `engine.errors`, `engine.wire` and `engine.registry` metadata helpers so
the API process can use them without loading torch.
"""
