"""casbin decides every route. Table-driven: each route × role against the reviewed
expectation below, on SQLite and PostgreSQL; a route without a declared permission fails
the suite; the enforcer fails closed."""

from __future__ import annotations

import pytest
import tinker
from sqlalchemy import func, select

from audit.db import make_engine, make_sessionmaker, transaction
from audit.models import AuditEntry, PolicyRule
from gateway.app import api_routes, create_app
from gateway.permissions import ROUTE_PERMISSIONS
from migrations import upgrade_to_head
from policy.authz import Authorizer, Denied, add_rule, remove_rule, seed_default_policy
from policy.keys import authenticate
from tests.api.helpers import TINY, service

SESSION = {"client_config", "client_dynamic_config", "healthz", "get_server_capabilities",
           "create_session", "session_heartbeat", "finish_session", "telemetry"}
RECORDS = {"list_training_runs", "get_training_run", "list_run_checkpoints",
           "list_user_checkpoints", "weights_info", "list_sessions", "get_session",
           "get_sampler", "get_usage", "list_releases", "get_release", "get_release_report"}
TRAIN_AND_SAMPLE = {"create_model", "forward_backward", "optim_step", "save_weights",
                    "save_weights_for_sampler", "load_weights", "get_info",
                    "create_sampling_session", "asample"}
POLICY_READ = {"admin_list_policy", "admin_list_keys", "admin_list_access_requests",
               "admin_get_screening"}
AUDIT_READ = {"audit_entries", "audit_export", "audit_day"}
METRICS = {"metrics"}
POLICY_WRITE = {"admin_add_policy_rule", "admin_remove_policy_rule", "admin_create_key",
                "admin_add_key", "admin_revoke_key", "admin_approve_access", "admin_reject_access",
                "admin_set_screening_threshold", "admin_reinstate_principal"}
DRY_RUN = {"screening_dry_run"}
PUBLIC = {"request_access", "claim_access"}
MANAGE = {"delete_checkpoint", "set_checkpoint_ttl", "unpublish_checkpoint",
          "publish_checkpoint", "save_weights_external", "external_weights_urls",
          "download_external_weights", "request_release"}
# The two-person override: admins request, auditors approve, both list.
OVERRIDE_LIST = {"admin_list_overrides"}
OVERRIDE_REQUEST = {"admin_request_override"}
OVERRIDE_APPROVE = {"admin_approve_override"}

# The reviewed expectation: which routes each role may call (ownership is checked apart).
ALLOWED = {
    "anonymous": PUBLIC,
    "researcher": SESSION | RECORDS | TRAIN_AND_SAMPLE | MANAGE | DRY_RUN | {"retrieve_future"},
    "auditor": SESSION | RECORDS | POLICY_READ | AUDIT_READ | METRICS | DRY_RUN
    | {"retrieve_future"} | OVERRIDE_LIST | OVERRIDE_APPROVE,
    "admin": SESSION | RECORDS | POLICY_READ | AUDIT_READ | METRICS | POLICY_WRITE
    | OVERRIDE_LIST | OVERRIDE_REQUEST,
}


def _api_routes() -> set[str]:
    app = create_app()
    names = {r.name for r in api_routes(app)}
    everything = {getattr(r, "name", None) for r in app.router.routes}
    assert {"openapi", "swagger_ui_html", "redoc_html"} & everything == set()
    return names


def test_every_route_declares_a_permission_and_no_entry_is_stale():
    routes = _api_routes()
    assert routes - set(ROUTE_PERMISSIONS) == set(), "routes without a policy decision"
    assert set(ROUTE_PERMISSIONS) - routes == set(), "permissions for routes that do not exist"


def test_the_expectation_table_covers_every_route():
    every = (SESSION | RECORDS | TRAIN_AND_SAMPLE | MANAGE | POLICY_READ | POLICY_WRITE
             | AUDIT_READ | METRICS | DRY_RUN | OVERRIDE_LIST | OVERRIDE_REQUEST
             | OVERRIDE_APPROVE)
    assert every | PUBLIC | {"retrieve_future", "create_custom_loss"} == _api_routes()


@pytest.fixture
def authorizer(database_url):
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)
    with transaction(factory) as session:
        seed_default_policy(session)
    authz = Authorizer(factory)
    authz.load()
    yield authz, factory
    engine.dispose()


def test_each_route_and_role_gets_the_reviewed_decision(authorizer):
    authz, _ = authorizer
    decisions = {
        (route, role): authz.allows("p-1", role, *ROUTE_PERMISSIONS[route])
        for route in ROUTE_PERMISSIONS for role in ALLOWED
    }
    expected = {(route, role): route in ALLOWED[role] for route, role in decisions}
    wrong = {k: v for k, v in decisions.items() if v != expected[k]}
    assert wrong == {}


def test_custom_losses_are_denied_for_everyone(authorizer):
    authz, _ = authorizer
    for role in ("researcher", "auditor", "admin", "anything"):
        assert not authz.allows("p-1", role, "training", "custom_loss")


def test_unknown_roles_and_resources_are_denied(authorizer):
    authz, _ = authorizer
    assert not authz.allows("p-1", "superuser", "training", "write")
    assert not authz.allows("p-1", "researcher", "keys", "create")


def test_the_enforcer_fails_closed(authorizer):
    authz, _ = authorizer
    assert authz.allows("p-1", "researcher", "training", "write")
    authz.disable()
    assert not authz.allows("p-1", "researcher", "training", "write")
    with pytest.raises(Denied):
        authz.authorize("p-1", "researcher", "training", "write")
    unloaded = Authorizer(authorizer[1])
    assert not unloaded.allows("p-1", "researcher", "training", "write")


def test_seeding_is_audited_and_happens_once(authorizer):
    _, factory = authorizer
    with transaction(factory) as session:
        assert seed_default_policy(session) == 0
        seeds = session.scalar(select(func.count()).select_from(AuditEntry)
                               .where(AuditEntry.event_type == "policy.seed"))
    assert seeds == 1


def test_a_deny_rule_for_one_principal_overrides_the_role_after_a_reload(authorizer):
    authz, factory = authorizer
    with transaction(factory) as session:
        session.add(PolicyRule(ptype="p", v0="principal:p-1", v1="training", v2="write",
                               v3="deny"))
    assert authz.allows("p-1", "researcher", "training", "write")  # not reloaded yet
    authz.load()
    assert not authz.allows("p-1", "researcher", "training", "write")
    assert authz.allows("p-2", "researcher", "training", "write")


@pytest.mark.parametrize("role", ["auditor", "admin"])
def test_non_researchers_cannot_train_and_are_told_why_at_once(server, role):
    import time

    key = server.create_key(role=role)
    sc = service(server, key)
    with transaction(server.state.read_factory) as session:
        before = session.scalar(select(func.count()).select_from(AuditEntry))
    start = time.monotonic()
    with pytest.raises(tinker.PermissionDeniedError, match=f"role '{role}'"):
        sc.create_lora_training_client(base_model=TINY, rank=4).result()
    # The window includes the SDK's session set-up; a retried refusal would take minutes.
    assert time.monotonic() - start < 5.0
    with transaction(server.state.read_factory) as session:
        caller = authenticate(session, key)[0].id
        # This caller's rows only: SDK clients of earlier tests still heartbeat against the
        # shared server (with revoked keys, too), and their denials land in the same window.
        rows = session.scalars(select(AuditEntry).where(AuditEntry.seq > before,
                                                        AuditEntry.actor == caller)
                               .order_by(AuditEntry.seq)).all()
    denials = [r for r in rows if r.decision == "deny"]
    assert [r.event_type for r in denials] == ["api.create_model"]
    # Reading records is allowed for both roles (everyone's: see test_route_object_matrix).
    tinker.RestClient(base_url=server.base_url, api_key=key).list_training_runs().result()


def test_a_process_that_missed_a_remove_and_an_add_still_reloads(authorizer):
    """SQLite may give a new rule the id of the one just removed; the rules' digest, not
    their count and newest id, tells a process that the policy changed."""
    authz, factory = authorizer
    reader = make_sessionmaker(make_engine(
        factory.kw["bind"].url.render_as_string(hide_password=False), read_only=True))
    with transaction(factory) as session:
        rule = add_rule(session, actor="t", subject="principal:p-1", resource="training",
                        action="write", effect="deny")
    with transaction(reader) as session:
        authz.ensure_current(session)
    assert not authz.allows("p-1", "researcher", "training", "write")
    before = authz.version
    with transaction(factory) as session:  # meanwhile, in another process:
        remove_rule(session, actor="t", rule_id=rule.id)
        add_rule(session, actor="t", subject="principal:p-2", resource="training",
                 action="write", effect="deny")
    with transaction(reader) as session:
        authz.ensure_current(session)
    assert authz.allows("p-1", "researcher", "training", "write")
    assert not authz.allows("p-2", "researcher", "training", "write")
    assert authz.version != before
