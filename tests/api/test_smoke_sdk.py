"""The official SDK reaches a live gateway: start-up calls, sessions, REST listings."""

from __future__ import annotations

import tinker


def test_rest_client_lists_an_empty_account(server, api_key):
    rest = tinker.RestClient(base_url=server.base_url, api_key=api_key)
    runs = rest.list_training_runs().result()
    assert runs.training_runs == []
    assert runs.cursor.total_count == 0


def test_server_capabilities_name_the_served_model(server, api_key):
    caps = tinker.RestClient(base_url=server.base_url,
                             api_key=api_key).get_server_capabilities().result()
    assert [m.model_name for m in caps.supported_models] == ["loragate/tiny-llama"]
