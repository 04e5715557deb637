"""What each route asks the policy for: route name → (resource, action).

Every route must appear here: the request context refuses (403) any route without an
entry, and `tests/policy/test_route_permissions.py` fails the suite when a new route is
added without one. Object ownership is checked separately (gateway.ownership).
"""

from __future__ import annotations

Permission = tuple[str, str]

ROUTE_PERMISSIONS: dict[str, Permission] = {
    # SDK start-up and background traffic
    "client_config": ("session", "use"),
    "client_dynamic_config": ("session", "use"),
    "healthz": ("session", "use"),
    "get_server_capabilities": ("session", "use"),
    "create_session": ("session", "use"),
    "session_heartbeat": ("session", "use"),
    "finish_session": ("session", "use"),
    "telemetry": ("session", "use"),
    # training
    "create_model": ("training", "write"),
    "forward_backward": ("training", "write"),
    "optim_step": ("training", "write"),
    "save_weights": ("training", "write"),
    "save_weights_for_sampler": ("training", "write"),
    "load_weights": ("training", "write"),
    "get_info": ("training", "read"),
    "create_custom_loss": ("training", "custom_loss"),
    # sampling and results
    "create_sampling_session": ("sampling", "use"),
    "asample": ("sampling", "use"),
    "retrieve_future": ("futures", "read"),
    # weights leaving the gateway
    "save_weights_external": ("weights", "export"),
    "external_weights_urls": ("weights", "export"),
    "download_external_weights": ("weights", "export"),
    # the release gate: ask for and follow an evaluation; the two-person override
    "request_release": ("releases", "request"),
    "list_releases": ("records", "read"),
    "get_release": ("records", "read"),
    "get_release_report": ("records", "read"),
    "admin_list_overrides": ("releases", "read_overrides"),
    "admin_request_override": ("releases", "override_request"),
    "admin_approve_override": ("releases", "override_approve"),
    # records (RestClient)
    "list_training_runs": ("records", "read"),
    "get_training_run": ("records", "read"),
    "list_run_checkpoints": ("records", "read"),
    "list_user_checkpoints": ("records", "read"),
    "weights_info": ("records", "read"),
    "list_sessions": ("records", "read"),
    "get_session": ("records", "read"),
    "get_sampler": ("records", "read"),
    "get_usage": ("records", "read"),
    # checkpoint management
    "delete_checkpoint": ("checkpoints", "manage"),
    "set_checkpoint_ttl": ("checkpoints", "manage"),
    "unpublish_checkpoint": ("checkpoints", "manage"),
    "publish_checkpoint": ("checkpoints", "publish"),
    # screening: a dry run before training; the thresholds in force
    "screening_dry_run": ("screening", "dry_run"),
    "admin_get_screening": ("policy", "read"),
    "admin_set_screening_threshold": ("policy", "write"),
    # the audit trail (auditors, admins)
    "audit_entries": ("audit", "read"),
    "audit_export": ("audit", "read"),
    "audit_day": ("audit", "read"),
    # operational metrics: counts and timings, never request contents (auditors, admins)
    "metrics": ("metrics", "read"),
    # administration
    "admin_list_policy": ("policy", "read"),
    "admin_add_policy_rule": ("policy", "write"),
    "admin_remove_policy_rule": ("policy", "write"),
    "admin_list_keys": ("keys", "read"),
    "admin_create_key": ("keys", "write"),
    "admin_add_key": ("keys", "write"),
    "admin_revoke_key": ("keys", "write"),
    "admin_reinstate_principal": ("keys", "write"),
    "admin_list_access_requests": ("keys", "read"),
    "admin_approve_access": ("keys", "write"),
    "admin_reject_access": ("keys", "write"),
    # before a key exists (role "anonymous")
    "request_access": ("access", "request"),
    "claim_access": ("access", "claim"),
}
