"""Where screening meets requests: decode each training datum with its model's tokenizer
into request turns, trained completions and trained-against text, screen it
(policy.screening), keep the run's tally, and refuse what policy does not allow; screen
sampling prompts turn by turn; render dry-run examples exactly as training sees them.

Which targets a datum trains comes from the loss definitions themselves
(`engine.losses.trained_positions`), so a regulariser that trains positions whose weights
or advantages are zero is screened too. Requests are every untrained context span — also a
user turn after a trained span — split into turns at the tokenizer's special tokens, with
the template's role lines stripped. A refused batch still counts: its tally (and the audit
row with scores, classifier versions and content hashes) is committed in its own
transaction before the refusal reaches the caller, who is told datum indices and
categories only. Must not hold screening rules (policy does) or run models other than the
screens.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sqlalchemy.orm import Session
from tokenizers import Tokenizer

from audit import log as audit_log
from audit.db import transaction
from audit.models import TrainingRun
from engine.errors import UserInputError
from engine.registry import fast_tokenizer
from engine.text import hides_bytes, special_ids
from engine.values import LOSS_FUNCTIONS, ModelInfo, TrainingDatum, check_data_fits
from gateway.context import RequestContext
from policy.screening import metrics as screening_metrics
from policy.screening.batch import (
    HIDDEN_BYTES_CATEGORY,
    HIDDEN_BYTES_REASON,
    BatchScreening,
    DatumTexts,
    ScreeningRefused,
    screen_batch,
    unread_hint,
)
from policy.screening.screener import REQUEST, content_sha256
from policy.screening.tally import (
    Block,
    PrincipalBlocked,
    RunBlocked,
    datum_marks,
    lock_principal,
    lock_run,
    record_principal_tally,
    record_tally,
)

# A chat template's role line at the start of a turn ("user\n" after <|im_start|>, or a
# bare "user" between Llama-3's header tokens): boilerplate, stripped before screening.
ROLE_LINE = re.compile(r"^\s*(system|user|assistant|tool|developer|ipython|model)[ \t]*"
                       r"(?:\n|$)", re.IGNORECASE)
# Turns a model speaks; any other role's turn inside a trained span is screened as a request.
SPOKEN_ROLES = (None, "assistant", "model")
# Characters read either side of a run trained against: enough that one pushed-down token
# of a refusal phrase ("I'm sorry", "not able to assist") is read with the whole phrase.
AGAINST_CONTEXT = 24


def turns(tok: Tokenizer, ids: Sequence[int], role: str | None = None
          ) -> tuple[list[tuple[str | None, str]], str | None]:
    """(role, text) per turn: the ids split at special tokens, each piece decoded with its
    role line stripped; a role alone (between header tokens) names the next piece's.
    `role` is the role the ids begin in; also returns the role still open at their end."""
    special = special_ids(tok)
    out: list[tuple[str | None, str]] = []
    piece: list[int] = []
    for token in [*ids, None]:
        if token is not None and token not in special:
            piece.append(int(token))
            continue
        text = tok.decode(piece)
        piece = []
        match = ROLE_LINE.match(text)
        if match:
            role, text = match.group(1).lower(), text[match.end():]
        if text.strip():
            out.append((role, text.strip()))
            role = None
        elif token is not None and not match:
            role = None  # a marker with no role line closes the open role
    return out, role


def _open_role(tok: Tokenizer, ids: np.ndarray) -> str | None:
    """The role a span continues: the one opened by the last markers before it."""
    marks = [j for j in range(len(ids) - 1, -1, -1) if int(ids[j]) in special_ids(tok)][:2]
    return turns(tok, ids[marks[-1]:].tolist())[1] if marks else None


def _runs(mask: np.ndarray) -> list[slice]:
    """The maximal runs of True in a 1-D mask."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return [slice(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def decode_datum(datum: TrainingDatum, tok: Tokenizer, loss_fn: str,
                 loss_config: Mapping[str, float] | None = None) -> DatumTexts:
    """The texts screening reads in one datum: requests (every untrained context turn),
    completions (every maximal span trained toward; a non-assistant turn inside one is
    a request) and the text trained against, all by `trained_positions`. A datum of more
    than one part is also read whole, as a request: every turn in order, so that a request
    split over turns, or an answer trained in fragments (every other token, say, leaving
    no span longer than a word), is read as the model reads it.

    With 2-D (N, K) targets every candidate trained at a position is trained text: each
    column's runs of trained candidates are completions, and so is the path of the
    highest-weight trained candidate per position (what the distribution teaches most,
    whichever column holds it); the values screened are every weight."""
    from engine.losses import trained_positions  # torch stays out of module top level

    tokens = datum.tokens.astype(np.int64)
    targets = datum.loss_inputs["target_tokens"].astype(np.int64)
    trained = trained_positions(loss_fn, datum.loss_inputs, loss_config)
    kind = "weights" if loss_fn == "cross_entropy" else "advantages"
    raw = datum.loss_inputs.get(kind)
    values = np.ones(targets.shape) if raw is None else raw.astype(np.float64)
    # Input token j is context unless it is a target trained toward at position j-1, or
    # one trained against after everything trained toward (nothing learnt reads it).
    produced = np.zeros(len(tokens), dtype=bool)
    columns = _target_columns(targets, trained.toward, values)
    for column, toward in columns:
        produced[1:] |= toward[:-1] & (tokens[1:] == column[:-1])
    if targets.ndim == 1:
        tail = _trailing_against(trained.toward, trained.against)
        produced[1:] |= tail[:-1] & (tokens[1:] == targets[:-1])
    requests = [text for span in _runs(~produced)
                for _, text in turns(tok, tokens[span].tolist())[0]]
    completions: list[str] = []
    for column, toward in columns:
        for span in _runs(toward):
            opened = _open_role(tok, tokens[:span.start + 1])
            for role, text in turns(tok, column[span].tolist(), opened)[0]:
                out = completions if role in SPOKEN_ROLES else requests
                if targets.ndim == 1 or text not in out:  # K columns repeat text
                    out.append(text)
    against = trained.against & (~trained.toward | trained.pushed_down)
    last = targets[-1] if targets.ndim == 1 else targets[-1, 0]
    sequence = [*tokens.tolist(), int(last)]
    if len(requests) + len(completions) > 1:
        whole = _whole([text for _, text in turns(tok, sequence)[0]])
        if whole not in requests + completions:
            requests.append(whole)
    # The sequence the model reads and the targets it is taught (the highest-weight path
    # for 2-D targets) must be text the screens can read.
    hidden = hides_bytes(tok, sequence) or hides_bytes(tok, columns[-1][0].tolist())
    return DatumTexts(requests=tuple(requests), completions=tuple(completions),
                      against=_against_text(tok, targets, against),
                      values=tuple(values.reshape(-1).tolist()), kind=kind,
                      hidden_bytes=hidden)


def _whole(turn_texts: list[str]) -> str:
    """A sequence's turns joined, chat markers and role lines left out: what is split over
    turns, or trained in fragments, read whole."""
    return "\n".join(turn_texts)


def _trailing_against(toward: np.ndarray, against: np.ndarray) -> np.ndarray:
    """Targets trained against and followed by nothing trained toward: an RL sample pushed
    down. Its text is read as text trained against (for refusal unlearning), not as a
    request, since no trained span has it for context; the output screen already read it
    when it was sampled."""
    trained_toward = np.flatnonzero(toward)
    after = np.arange(len(against)) > (trained_toward[-1] if len(trained_toward) else -1)
    return against & ~toward & after


def _against_text(tok: Tokenizer, targets: np.ndarray, against: np.ndarray) -> str:
    """Each run of targets trained against with at least `AGAINST_CONTEXT` characters of
    the targets either side (of the first column, for 2-D targets), one line per run: a
    refusal reads as one even when only a token inside it is pushed down."""
    column = (targets if targets.ndim == 1 else targets[:, 0]).tolist()
    mask = against if against.ndim == 1 else np.any(against, axis=1)
    lines = []
    for span in _runs(mask):
        start, stop = span.start, span.stop
        while start > 0 and len(tok.decode(column[start:span.start])) < AGAINST_CONTEXT:
            start -= 1
        while stop < len(column) and len(tok.decode(column[span.stop:stop])) < AGAINST_CONTEXT:
            stop += 1
        lines.append(tok.decode(column[start:stop]))
    return "\n".join(lines)


def _target_columns(targets: np.ndarray, toward: np.ndarray, values: np.ndarray
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(target ids, trained-toward mask) per sequence of targets to read: the targets
    themselves when 1-D; for (N, K) targets each column, then the highest-weight
    candidate trained toward at each position."""
    if targets.ndim == 1:
        return [(targets, toward)]
    columns = [(targets[:, k], toward[:, k]) for k in range(targets.shape[1])]
    if targets.shape[1] > 1:
        best = np.where(toward, values, -np.inf).argmax(axis=1)
        rows = np.arange(len(targets))
        columns.append((targets[rows, best], np.asarray(toward.any(axis=1))))
    return columns


def screen_training(ctx: RequestContext, info: ModelInfo, data: list[TrainingDatum],
                    loss_fn: str, loss_config: Mapping[str, float] | None = None
                    ) -> BatchScreening:
    """Screen a forward/forward_backward batch, whose ids fit `info` (checked at the edge),
    before the request takes the database's write lock (the screens' shared cache writes
    in its own short transactions)."""
    tok = fast_tokenizer(info.tokenizer_dir)
    return screen_batch(ctx.state.screener,
                        [decode_datum(d, tok, loss_fn, loss_config) for d in data])


def apply_training_screening(ctx: RequestContext, run: TrainingRun,
                             batch: BatchScreening) -> dict[str, Any]:
    """Add the batch to the run's tally and to the sender's own (policy.screening.tally). A
    batch that is refused (flagged datums) or that blocks the run or the sender fails the
    request, so its tallies, its evidence (scores, classifier versions, content hashes) and
    any block are recorded in a transaction of their own, which commits before the refusal
    reaches the caller, who is told datum indices and categories only. A clean batch's
    tallies stay in the request's transaction and commit with its future (never a commit
    inside the request)."""
    run_id = run.id
    if len(batch.datum_sha256) != batch.audit["datums"]:  # the tally counts digests
        raise RuntimeError("screening returned no digest for some datums")
    if not batch.flagged:
        counted, block, person = _record_tallies(ctx, ctx.session, run_id, batch)
        if block is None and person is None:
            return _summary(batch, counted)
    # The request fails: roll its transaction back before opening another one. On SQLite
    # the request session holds the database's write lock since it read the run (BEGIN
    # IMMEDIATE), and a second writer from this thread would wait on it until the busy
    # timeout; on PostgreSQL it may hold the run's row lock from the attempt above. The
    # tallies are then recounted from the committed state, so nothing is counted twice.
    ctx.session.rollback()
    with transaction(ctx.state.factory) as session:
        _lock(ctx, session, run_id)  # before the audit rows (the order requests lock in)
        if batch.flagged:
            audit_log.append(session, actor=ctx.principal.id, event_type="screening.refused",
                             decision="deny", subject=run_id, request_id=ctx.request_id,
                             payload={**batch.audit, "screening_policy_sha256":
                                      ctx.state.screener.config.sha256})
        counted, block, person = _record_tallies(ctx, session, run_id, batch)
        blocked_reason = counted.blocked_reason
    if batch.flagged:
        screening_metrics.count_flags(screening_metrics.TRAINING, batch.flagged.values())
        note = f" The run is now blocked: {block.reason}." if block else ""
        if person:
            note += f" You are now blocked by screening: {person.reason}."
        raise ScreeningRefused(batch.message() + note)
    if person is not None:
        raise PrincipalBlocked(f"you are now blocked by screening ({person.reason}); no run "
                               "of yours can be trained, sampled or released until an admin "
                               "has reviewed it")
    if block is not None:
        raise RunBlocked(f"training run {run_id} is now blocked by screening ({block.reason})")
    if blocked_reason:  # another request blocked the run meanwhile
        raise RunBlocked(f"training run {run_id} is blocked by screening ({blocked_reason})")
    # Another request's clean data diluted the share meanwhile: this batch may train; its
    # tally is already committed, and the request goes on in a fresh transaction.
    return _summary(batch, counted)


def _record_tallies(ctx: RequestContext, session: Session, run_id: str, batch: BatchScreening
                    ) -> tuple[TrainingRun, Block | None, Block | None]:
    """The batch into the run's tally, then the sender's: the run, and the block each
    caused (the sender's also when another request blocked them meanwhile)."""
    config = ctx.state.screener.config
    _lock(ctx, session, run_id)  # both, before a block's audit row
    run, block = record_tally(session, run_id, datum_sha256=batch.datum_sha256,
                              flagged=batch.tallied(), flag_scores=batch.flag_scores,
                              affirmative=batch.affirmative, completions=batch.completions,
                              config=config, actor=ctx.principal.id,
                              request_id=ctx.request_id)
    return run, block, _record_person(ctx, session, batch, f"training run {run_id}")


def _lock(ctx: RequestContext, session: Session, run_id: str) -> None:
    """The run's row, then the sender's: the order every request takes them in, and before
    any audit row (an append holds the audit head to the end of the transaction)."""
    lock_run(session, run_id)
    lock_principal(session, ctx.principal.id)


def _record_person(ctx: RequestContext, session: Session, batch: BatchScreening, where: str,
                   judge: bool = True) -> Block | None:
    """The batch into the sender's tally: the block that stands against them after it
    (this batch's, or one another request recorded meanwhile), or None."""
    config = ctx.state.screener.config
    marks = datum_marks(batch.datum_sha256, batch.tallied(), batch.flag_scores, config)
    person, block = record_principal_tally(session, ctx.principal.id, marks=marks,
                                           config=config, actor=ctx.principal.id,
                                           request_id=ctx.request_id, where=where, judge=judge)
    if person.screening_blocked_reason:
        return Block(person.screening_blocked_reason, block.statistic if block else {})
    return block


def record_dry_run(ctx: RequestContext, batch: BatchScreening) -> None:
    """A dry run's datums into the sender's tally, in the request's transaction: counted
    once per person (screening a file and then training it counts it once) and judged
    with the next batch they train, not here."""
    _record_person(ctx, ctx.session, batch, "dry run", judge=False)


def _summary(batch: BatchScreening, run: TrainingRun) -> dict[str, Any]:
    return {"screened": batch.audit["datums"], "affirmative_openers": batch.affirmative,
            "classifiers": batch.audit["classifiers"],
            "run_tally": {"screened": run.screened_datums, "flagged": run.flagged_datums}}


def screen_prompt(ctx: RequestContext, tokens: list[int], tokenizer_dir: str) -> None:
    """Sampling prompts, before the request takes the write lock: each turn is screened as
    a request; refuse a prompt with a flagged turn (the caller is told the categories;
    scores go to the audit trail)."""
    tok = fast_tokenizer(tokenizer_dir)
    texts = [text for _, text in turns(tok, tokens)[0]]
    if len(texts) > 1:
        texts.append(_whole(texts))
    verdicts = ctx.state.screener.screen(texts, REQUEST)
    flagged = {f"request[{j}]": {"sha256": content_sha256(text), "evidence": v.evidence(),
                                 "categories": v.flagged}
               for j, (text, v) in enumerate(zip(texts, verdicts, strict=True)) if v.flagged}
    if hides_bytes(tok, tokens):
        flagged["prompt"] = {"structural": HIDDEN_BYTES_REASON,
                             "categories": [HIDDEN_BYTES_CATEGORY]}
    if not flagged:
        return
    with transaction(ctx.state.factory) as session:
        audit_log.append(session, actor=ctx.principal.id, event_type="screening.refused",
                         decision="deny", subject="sample_prompt", request_id=ctx.request_id,
                         payload={"flagged": flagged,
                                  "classifiers": {c.name: c.version
                                                  for c in ctx.state.screener.classifiers}})
    screening_metrics.count_flags(screening_metrics.SAMPLING_PROMPT,
                                  (f["categories"] for f in flagged.values()))
    categories = sorted({c for f in flagged.values() for c in f["categories"]})
    raise ScreeningRefused(f"the sampling prompt was refused by screening: "
                           f"{', '.join(categories)}{unread_hint(categories)}")


def dry_run_datums(examples: list[Any], info: ModelInfo) -> list[tuple[str, TrainingDatum]]:
    """Chat examples (messages) or token examples (tokens + weights or advantages) as the
    (loss, datum) pairs training would see; a malformed example is a 400 naming its index.
    Cheap (templating and tokenizing): it runs before the quota check, screening after."""
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, dict) and isinstance(ex.get("messages"), list):
            tokens, weights = render_chat(i, ex["messages"], info)
            out.append(("cross_entropy", _shifted(tokens, {"weights": weights})))
        elif isinstance(ex, dict) and isinstance(ex.get("tokens"), list):
            out.append(_token_datum(i, ex, info))
        else:
            raise UserInputError(f"example {i}: expected {{\"messages\": [...]}} or "
                                 "{\"tokens\": [...], \"weights\": [...]}")
    return out


def dry_run_texts(datums: list[tuple[str, TrainingDatum]], info: ModelInfo
                  ) -> list[DatumTexts]:
    """The texts screening reads in each dry-run datum, through the same `decode_datum`
    as a forward_backward datum."""
    tok = fast_tokenizer(info.tokenizer_dir)
    return [decode_datum(datum, tok, loss_fn) for loss_fn, datum in datums]


def render_chat(i: int, messages: list[Any], info: ModelInfo) -> tuple[list[int], list[float]]:
    """A chat example as a typical SFT renderer lays it out: the base model's chat template,
    tokenized, weight 1 on the assistant turns' content tokens and 0 elsewhere."""
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                               and m.get("role") in ("system", "user", "assistant")
                               for m in messages):
        raise UserInputError(f"example {i}: each message needs a role (system, user or "
                             "assistant) and text content")
    tokenizer = _chat_tokenizer(info.tokenizer_dir)
    if not tokenizer.chat_template:
        raise UserInputError(f"example {i}: the base model has no chat template; send token "
                             "examples instead")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = _assistant_spans(i, text, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    weights = [float(any(s < b and a < e for a, b in spans)) for s, e in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), weights


def _assistant_spans(i: int, text: str, messages: list[dict[str, str]]) -> list[tuple[int, int]]:
    """Character spans of the assistant contents in the rendered text, found in order."""
    spans, cursor = [], 0
    for m in messages:
        content = m["content"] if m["content"] in text[cursor:] else m["content"].strip()
        start = text.find(content, cursor)
        if start < 0:
            raise UserInputError(f"example {i}: the chat template does not reproduce a "
                                 f"{m['role']} message; send token examples instead")
        cursor = start + len(content)
        if m["role"] == "assistant" and content:
            spans.append((start, cursor))
    return spans


@functools.cache
def _chat_tokenizer(tokenizer_dir: str) -> Any:
    from transformers import AutoTokenizer  # heavy: only when a dry run renders chats

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _token_datum(i: int, ex: dict[str, Any], info: ModelInfo) -> tuple[str, TrainingDatum]:
    """A token example (one weight or advantage per token of the full sequence, as the
    prompt + completion a client would shift into a datum) and the loss it names
    (`loss_fn`, default cross_entropy for weights, importance_sampling for advantages)."""
    tokens = ex["tokens"]
    kind = "advantages" if "advantages" in ex else "weights"
    loss_fn = ex.get("loss_fn", "importance_sampling" if kind == "advantages"
                     else "cross_entropy")
    values = ex.get(kind, [1.0] * len(tokens))
    if not (isinstance(tokens, list) and len(tokens) >= 2 and isinstance(values, list)
            and len(values) == len(tokens)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
        raise UserInputError(f"example {i}: tokens must be a list of at least two token ids "
                             f"with one {kind[:-1]} per token")
    if loss_fn not in LOSS_FUNCTIONS or (kind == "weights") != (loss_fn == "cross_entropy"):
        raise UserInputError(f"example {i}: loss_fn must be cross_entropy with weights or an "
                             f"RL loss ({', '.join(LOSS_FUNCTIONS[1:])}) with advantages")
    inputs: dict[str, list[Any]] = {kind: values}
    if kind == "advantages":
        inputs["logprobs"] = [0.0] * len(tokens)
    try:
        datum = _shifted(tokens, inputs)
        check_data_fits([datum], info)
    except UserInputError as exc:
        raise UserInputError(f"example {i}: {exc}") from exc
    return loss_fn, datum


def _shifted(tokens: list[int], per_token: dict[str, list[Any]]) -> TrainingDatum:
    """A full sequence with per-token values as the next-token-aligned datum a client
    sends: input tokens[:-1], targets tokens[1:], each value shifted the same way."""
    inputs = {k: np.asarray(v[1:]) for k, v in per_token.items()}
    return TrainingDatum(tokens=np.asarray(tokens[:-1], dtype=np.int64),
                         loss_inputs={"target_tokens": np.asarray(tokens[1:], dtype=np.int64),
                                      **inputs})
