"""tinker-cookbook's own training loops, unchanged, against a live gateway on the tiny model,
on SQLite and PostgreSQL: its supervised loop (`supervised.train.main`, chat_sl style) on the
cookbook's example conversations, its RL loop (`rl.train.main`) on a verifiable-reward
environment defined here, sampling through the gateway and training with importance_sampling
and ppo, and its DPO loop (`preference.train_dpo.main`) through `forward_backward_custom` on a
local comparison file — which the gateway's screening refuses today (DPO's rejected datums
carry only negative weights, flagged as gradient ascent): that test checks the refusal is
exactly that and reports an expected failure until the screening judges such pairs.

Only configuration is ours: the recipes' network datasets become local builders, and the
tiny model's name resolves to its local tokenizer directory through the cookbook's own
`register_tokenizer`. Nothing downloads anything. The RL test has a server of its own whose
screening leaves out the learned harmful-content classifier (see `rl_server`). The cookbook
is installed with --no-deps (its requirements would downgrade transformers); `make setup`
installs the few packages its training modules import. Without them the module is skipped
locally; in CI (CI=true) it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import pytest

COOKBOOK_DEPS = ("tinker_cookbook", "chz", "blobfile", "datasets", "termcolor", "PIL")
_missing = [m for m in COOKBOOK_DEPS if importlib.util.find_spec(m) is None]
if _missing and not os.environ.get("CI"):
    pytest.skip(f"tinker-cookbook's training dependencies are not installed ({_missing}); "
                "make setup installs them (in an older venv: rm .venv/.installed first)",
                allow_module_level=True)

import chz  # noqa: E402
import tinker_cookbook  # noqa: E402
from sqlalchemy import select  # noqa: E402
from tinker_cookbook import renderers  # noqa: E402
from tinker_cookbook.preference import train_dpo  # noqa: E402
from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons  # noqa: E402
from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl  # noqa: E402
from tinker_cookbook.rl import train as rl_train  # noqa: E402
from tinker_cookbook.rl.problem_env import ProblemEnv, ProblemGroupBuilder  # noqa: E402
from tinker_cookbook.rl.types import EnvGroupBuilder, RLDataset, RLDatasetBuilder  # noqa: E402
from tinker_cookbook.supervised import train as sl_train  # noqa: E402
from tinker_cookbook.supervised.data import FromConversationFileBuilder  # noqa: E402
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig  # noqa: E402
from tinker_cookbook.tokenizer_utils import (  # noqa: E402
    get_tokenizer,
    register_tokenizer,
    unregister_tokenizer,
)

from audit.db import transaction  # noqa: E402
from audit.models import AuditEntry  # noqa: E402
from policy.keys import authenticate  # noqa: E402
from policy.screening.screener import DEFAULT_SCREENING_PATH  # noqa: E402
from tests.api.helpers import TINY, rest  # noqa: E402
from tests.conftest import LiveServer, _dialects  # noqa: E402
from tests.security.conftest import module_server  # noqa: E402

HERE = Path(__file__).resolve().parent
CONVERSATIONS = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
COMPARISONS = HERE / "comparisons.jsonl"
RENDERER = "role_colon"
RANK = 4


@pytest.fixture
def connect(monkeypatch) -> Iterator[Callable[[LiveServer], tuple[str, str]]]:
    """What a cookbook user sets up for a server: a key in TINKER_API_KEY (the recipes pass
    only base_url), and the model name resolving to the model's local tokenizer directory
    (the cookbook's `get_tokenizer` would otherwise ask the Hugging Face hub for
    "loragate/tiny-llama"). Returns (key, tokenizer directory)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def connect(server: LiveServer) -> tuple[str, str]:
        key = server.create_key()
        monkeypatch.setenv("TINKER_API_KEY", key)
        tokenizer_dir = str(server.state.registry.materialize(TINY))
        register_tokenizer(TINY, partial(get_tokenizer, tokenizer_dir))
        return key, tokenizer_dir

    try:
        yield connect
    finally:
        unregister_tokenizer(TINY)


@pytest.fixture(scope="module", params=_dialects())
def rl_server(request: pytest.FixtureRequest, models_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The default screening policy without the learned harmful-content classifier (the
    structural signals and rules stay on). The RL loop trains on what the random tiny model
    samples, and that classifier flags about 1-2% of such gibberish (even the single
    tokens "f" and "&"); the gateway then refuses the whole training step, so the test
    would fail at random. Real text is screened in the other tests here."""
    tmp = tmp_path_factory.mktemp("cookbook-rl")
    text, n = re.subn(r"(\[classifiers\.harmful_content\]\s*enabled = )true", r"\1false",
                      DEFAULT_SCREENING_PATH.read_text())
    assert n == 1
    (tmp / "screening.toml").write_text(text)
    with module_server(request.param, models_dir, tmp,
                       screening_file=tmp / "screening.toml") as live:
        yield live


@contextlib.contextmanager
def cookbook_logging() -> Iterator[None]:
    """The recipes replace the root logger's handlers with their own (a console and a file
    handler); put pytest's back afterwards so later tests are unaffected."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _events(server, key: str) -> Counter[str]:
    """The gateway's audit log, by event, for this key's principal."""
    with transaction(server.state.factory) as session:
        principal, _ = authenticate(session, key)
        return Counter(session.scalars(select(AuditEntry.event_type).where(
            AuditEntry.actor == principal.id)).all())


def _assert_the_gateway_holds_the_run(server, key: str, log_path: Path) -> None:
    """One training run of the tiny model for this key, whose checkpoints include the final
    one the recipe recorded in checkpoints.jsonl."""
    rc = rest(server, key)
    runs = rc.list_training_runs().result().training_runs
    assert len(runs) == 1
    run = runs[0]
    assert run.base_model == TINY and run.lora_rank == RANK
    final = _jsonl(log_path / "checkpoints.jsonl")[-1]
    assert final["name"] == "final"
    saved = {c.tinker_path for c in rc.list_checkpoints(run.training_run_id).result().checkpoints}
    assert {final["state_path"], final["sampler_path"]} <= saved


def _common_config(tokenizer_dir: str, batch_size: int) -> ChatDatasetBuilderCommonConfig:
    return ChatDatasetBuilderCommonConfig(model_name_for_tokenizer=tokenizer_dir,
                                          renderer_name=RENDERER, max_length=64,
                                          batch_size=batch_size)


# -- supervised (chat_sl) ---------------------------------------------------------------

def test_the_cookbooks_supervised_loop_trains_on_its_example_conversations(
        server, connect, tmp_path):
    """The whole example file is one batch, trained for three epochs: the mean NLL the loop
    reports falls, and a held-out split is scored by the cookbook's sampler evaluator."""
    key, tokenizer_dir = connect(server)
    log_path = tmp_path / "sl"
    n_conversations = len(_jsonl(CONVERSATIONS))
    config = sl_train.Config(
        log_path=str(log_path), model_name=TINY, recipe_name="loragate_test_chat_sl",
        renderer_name=RENDERER, lora_rank=RANK, base_url=server.base_url,
        dataset_builder=FromConversationFileBuilder(
            file_path=str(CONVERSATIONS), test_size=8,
            common_config=_common_config(tokenizer_dir, batch_size=n_conversations - 8)),
        learning_rate=1e-2, lr_schedule="constant", num_epochs=3, eval_every=2, save_every=2)
    with cookbook_logging():
        asyncio.run(sl_train.main(config))

    metrics = _jsonl(log_path / "metrics.jsonl")
    train = [m for m in metrics if "train_mean_nll" in m]
    assert [m["step"] for m in train] == [0, 1, 2]
    nll = [m["train_mean_nll"] for m in train]
    assert all(math.isfinite(x) for x in nll) and nll[2] < nll[0], nll
    assert all(m["num_sequences"] == n_conversations - 8 for m in train)
    test_nll = [m["test/nll"] for m in metrics if "test/nll" in m]
    assert len(test_nll) == 2 and all(math.isfinite(x) for x in test_nll), metrics
    assert test_nll[1] < test_nll[0]

    checkpoints = _jsonl(log_path / "checkpoints.jsonl")
    assert [c["name"] for c in checkpoints] == ["000002", "final"]
    _assert_the_gateway_holds_the_run(server, key, log_path)
    events = _events(server, key)
    assert events["api.forward_backward"] == 3 and events["api.optim_step"] == 3, events


# -- RL ---------------------------------------------------------------------------------

class SayTheLetterE(ProblemEnv):
    """A verifiable reward: the answer contains the letter "e" (a random tiny model's eight
    tokens often do and often do not, so groups tend to have nonzero advantages)."""

    def get_question(self) -> str:
        return "Say something with the letter e in it."

    def check_answer(self, sample_str: str) -> bool:
        return "e" in sample_str

    def check_format(self, sample_str: str) -> bool:
        return bool(sample_str.strip())

    def get_reference_answer(self) -> str:
        return "e"


class LetterDataset(RLDataset):
    def __init__(self, renderer: renderers.Renderer, batches: int, groups: int,
                 group_size: int) -> None:
        self.renderer, self.batches = renderer, batches
        self.groups, self.group_size = groups, group_size

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        return [ProblemGroupBuilder(env_thunk=partial(SayTheLetterE, self.renderer),
                                    num_envs=self.group_size, dataset_name="letter_e")
                for _ in range(self.groups)]

    def __len__(self) -> int:
        return self.batches


@chz.chz
class LetterDatasetBuilder(RLDatasetBuilder):
    tokenizer_dir: str
    batches: int = 2
    groups: int = 2
    group_size: int = 4

    async def __call__(self) -> tuple[RLDataset, RLDataset | None]:
        renderer = renderers.get_renderer(RENDERER, get_tokenizer(self.tokenizer_dir))
        return LetterDataset(renderer, self.batches, self.groups, self.group_size), None


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo"])
def test_the_cookbooks_rl_loop_samples_through_the_gateway_and_trains(
        rl_server, connect, tmp_path, loss_fn):
    """Two iterations of the synchronous loop: save weights for the sampler, roll out two
    groups of four through the gateway's sampler, train on the advantages, step."""
    server = rl_server
    key, tokenizer_dir = connect(server)
    log_path = tmp_path / "rl"
    config = rl_train.Config(
        log_path=str(log_path), model_name=TINY, recipe_name="loragate_test_rl",
        renderer_name=RENDERER, lora_rank=RANK, base_url=server.base_url,
        dataset_builder=LetterDatasetBuilder(tokenizer_dir=tokenizer_dir),
        learning_rate=1e-3, max_tokens=8, loss_fn=loss_fn, eval_every=0, save_every=0,
        max_steps=2)
    with cookbook_logging():
        asyncio.run(rl_train.main(config))

    metrics = _jsonl(log_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1]
    for m in metrics:
        reward = m["env/all/reward/total"]
        assert math.isfinite(reward) and -0.1 <= reward <= 1.0, m
        assert m["env/all/ac_tokens_per_turn"] > 0, m
    _assert_the_gateway_holds_the_run(server, key, log_path)
    events = _events(server, key)
    # One sample request per rollout: two groups of four, in each of two iterations.
    assert events["api.asample"] == 16, events
    assert events["api.forward_backward"] >= 2 and events["api.optim_step"] == 2, events
    assert events["api.save_weights_for_sampler"] >= 2, events


# -- DPO --------------------------------------------------------------------------------

def test_the_cookbooks_dpo_loop_trains_through_forward_backward_custom(
        server, connect, tmp_path):
    """All four comparisons are one batch, trained twice: at the first step the policy is
    its own reference (loss log 2); after one update it prefers the chosen answers. The
    rejected answers go to the gateway with only negative weights."""
    key, tokenizer_dir = connect(server)
    log_path = tmp_path / "dpo"
    n_pairs = len(_jsonl(COMPARISONS))
    config = train_dpo.Config(
        log_path=str(log_path), model_name=TINY, recipe_name="loragate_test_dpo",
        renderer_name=RENDERER, lora_rank=RANK, base_url=server.base_url,
        dataset_builder=DPODatasetBuilderFromComparisons(
            comparison_builder=ComparisonBuilderFromJsonl(train_path=str(COMPARISONS)),
            common_config=_common_config(tokenizer_dir, batch_size=n_pairs)),
        learning_rate=1e-2, lr_schedule="constant", num_epochs=2, dpo_beta=0.5,
        eval_every=0, infrequent_eval_every=0, save_every=0)
    with cookbook_logging():
        train_dpo.main(config)

    metrics = _jsonl(log_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1]
    assert all(m["num_pairs"] == n_pairs for m in metrics)
    loss = [m["dpo_loss"] for m in metrics]
    assert loss[0] == pytest.approx(math.log(2), abs=1e-3), loss
    assert loss[1] < loss[0] and metrics[1]["accuracy"] > 0.5, metrics
    _assert_the_gateway_holds_the_run(server, key, log_path)
    events = _events(server, key)
    assert events["api.optim_step"] == 2, events
