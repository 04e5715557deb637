"""Training-run rows: the one place a `TrainingRun` is created, for a new LoRA run
(`create_model`) and for a run loaded from a checkpoint (`load_weights`).

Must not authorize, screen or queue anything: the routes check the caller and the source
weights first and admit the run's first job after.
"""

from __future__ import annotations

import json

from sqlalchemy.orm import Session

from audit.models import TrainingRun


def add_training_run(session: Session, *, run_id: str, session_id: str, model_seq_id: int,
                     principal_id: str, api_key_id: str | None, base_model: str,
                     lora_rank: int, lora_config: str,
                     user_metadata: dict[str, str] | None) -> TrainingRun:
    """The run (session, seq) maps to, created as `creating` unless a retried request
    created it already."""
    run = session.get(TrainingRun, run_id)
    if run is None:
        run = TrainingRun(id=run_id, session_id=session_id, model_seq_id=model_seq_id,
                          principal_id=principal_id, base_model=base_model,
                          lora_rank=lora_rank, lora_config=lora_config,
                          user_metadata=json.dumps(user_metadata or {}), status="creating",
                          api_key_id=api_key_id)
        session.add(run)
        session.flush()
    return run
