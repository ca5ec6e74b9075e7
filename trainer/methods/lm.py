"""Language-model calls on cached features: training loss, closed-set scoring, greedy decoding.

Same token layout as the engine (docs/ARCHITECTURE.md): [BOS] [soft prompt] USER: [image] ...
ASSISTANT: | " answer" EOS, left padded, position ids 0..L-1 over the non-pad tokens. The
request rows come from kaizen.export.reference.request_rows, the helper the reference path uses.

    loss = answer_loss(base, batch.image, batch.instructions, prompts, batch.answers)
    picks = score_candidates(base, feats, instructions, prompts, [["yes", "no"], ...])
    texts = greedy(base, feats, instructions, prompts, max_new_tokens=8)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kaizen.export.reference import left_pad, positions, request_rows
from kaizen.runtime.prompting import answer_ids


def _forward(base, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, vocab] of the language model on inputs_embeds (LoRA slots as set)."""
    model = base.model
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask),
                                     use_cache=False)
    return model.lm_head(out.last_hidden_state)


def with_answers(base, image, instructions, prompts, answers: list[str]):
    """(embeds, mask, labels): request rows + answer tokens; labels -100 except the answer (+EOS)."""
    rows = request_rows(base.model, base, image, instructions, prompts)
    table = base.model.get_input_embeddings()
    full, targets = [], []
    for row, ans in zip(rows, answers):
        ids = torch.from_numpy(answer_ids(base.tokenizer, base.spec, ans))
        full.append(torch.cat([row, table(ids).to(row.dtype)], dim=0))
        targets.append(torch.cat([torch.full((len(row),), -100, dtype=torch.long), ids]))
    embeds, mask = left_pad(full)
    labels = torch.full(mask.shape, -100, dtype=torch.long)
    for b, y in enumerate(targets):
        labels[b, labels.shape[1] - len(y):] = y
    return embeds, mask, labels


def answer_loss(base, image, instructions, prompts, answers) -> torch.Tensor:
    """Cross-entropy of the answer tokens (+EOS): mean per sample, then over samples.

    Every sample weighs the same whatever its answer's length, so the mean over equal shards of
    a batch (DDP) is exactly the mean over the batch.
    """
    embeds, mask, labels = with_answers(base, image, instructions, prompts, answers)
    logits = _forward(base, embeds, mask)
    tgt = labels[:, 1:]
    per_tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), tgt, ignore_index=-100, reduction="none")
    counts = (tgt != -100).sum(dim=1).clamp_min(1)
    return (per_tok.sum(dim=1) / counts).mean()


@torch.no_grad()
def answer_logprobs(base, image, instructions, prompts, answers) -> torch.Tensor:
    """Sum of log-probs of each " answer" + EOS given its request -> [B]."""
    embeds, mask, labels = with_answers(base, image, instructions, prompts, answers)
    logp = torch.log_softmax(_forward(base, embeds, mask)[:, :-1].float(), dim=-1)
    tgt = labels[:, 1:]
    picked = logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * (tgt != -100)).sum(dim=1)


@torch.no_grad()
def score_candidates(base, image, instructions, prompts, candidates: list[list[str]]) -> list[int]:
    """Index of the most probable candidate for each request (ties -> the first, as the engine)."""
    rows, owners = [], []
    for b, cands in enumerate(candidates):
        for c in cands:
            rows.append((b, c))
        owners.append(len(cands))
    idx = torch.as_tensor([b for b, _ in rows], dtype=torch.long)
    per = prompts if isinstance(prompts, (list, tuple)) else [prompts] * len(instructions)
    totals = answer_logprobs(base, image[idx], [instructions[b] for b, _ in rows], [per[b] for b, _ in rows],
                             [c for _, c in rows])
    picks, start = [], 0
    for n in owners:
        picks.append(int(torch.argmax(totals[start:start + n])))
        start += n
    return picks


@torch.no_grad()
def greedy(base, image, instructions, prompts, max_new_tokens: int = 8) -> list[str]:
    """Greedy decoding (full recompute per token: fine for short answers on small models)."""
    rows = request_rows(base.model, base, image, instructions, prompts)
    table = base.model.get_input_embeddings()
    eos = base.spec.eos_token_id
    out: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for _ in range(max_new_tokens):
        embeds, mask = left_pad(rows)
        nxt = _forward(base, embeds, mask)[:, -1].argmax(dim=-1)
        for b, tok in enumerate(nxt.tolist()):
            if not done[b]:
                out[b].append(tok)
                done[b] = tok == eos
            rows[b] = torch.cat([rows[b], table(torch.tensor([tok]))], dim=0)
        if all(done):
            break
    texts = []
    for ids in out:
        ids = [i for i in ids if i != eos]
        texts.append(base.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts
