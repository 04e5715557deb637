"""Fixtures for SDK-driven tests: a ServiceClient with a fresh key, and a LoRA
training client on the tiny model."""

from __future__ import annotations

import pytest

from tests.api.helpers import TINY, service


@pytest.fixture
def client(server, api_key):
    sc = service(server, api_key)
    yield sc
    sc.close("success").result()


@pytest.fixture
def trainer(client):
    return client.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
