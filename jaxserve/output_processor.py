"""From sampled tokens to RequestOutputs: append each token to its sequence, apply the stop
conditions (EOS / stop_token_ids, max_tokens, stop strings through the incremental
detokenizer), and shape outputs by SamplingParams.output_kind — "cumulative" (all so far),
"delta" (what is new since the last output) or "final_only"."""
from __future__ import annotations

from typing import Callable

from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sequence import Sequence

_INF = float("inf")
# A request whose next-token distribution is not finite cannot go on: finish it, say why.
NON_FINITE_ERROR = ("the model's logits for this request are not finite (NaN or infinity): the forward "
                    "overflowed, e.g. through an adapter whose weights are far too large")


def append_tokens(seqs: list[Sequence], tokens, logprobs, tops, now: float,
                  charge: Callable[[Sequence, int, int], None]) -> tuple[list[Sequence], list[Sequence], int]:
    """One step's sampled tokens, row by row: returns (sequences with something to report,
    sequences that ended, tokens appended). It runs for every sampled token: kept flat (no
    per-token calls in the common case beyond the append and the charge)."""
    ended, report, appended = [], [], 0
    for seq, token, logprob, top in zip(seqs, tokens, logprobs, tops):
        if seq.finish_reason is not None:  # aborted, or finished by the step before: surplus
            continue
        if not -_INF < logprob < _INF:  # NaN/inf logits (the comparison is False for NaN)
            seq.finish("error", error=NON_FINITE_ERROR)
            ended.append(seq)
            continue
        if not seq.output_token_ids:
            seq.metrics.first_token_time = now
        seq.append_token(token, logprob, top)
        appended += 1
        charge(seq, 0, 1)
        if token in seq.stop_ids:
            seq.finish("stop", token if token in seq.params.stop_token_ids else None)
        elif len(seq.output_token_ids) >= seq.max_tokens:
            seq.finish("length")
        if seq.output_kind != "final_only" or seq.params.stop:
            stop = seq.detokenizer.add(seq.output_token_ids) if seq.detokenizer is not None else None
            if stop is not None:
                seq.finish("stop", stop)
        if seq.finish_reason is not None:
            ended.append(seq)
        elif seq.output_kind != "final_only":
            report.append(seq)
    return report, ended, appended


def maybe_request_output(seq: Sequence) -> RequestOutput | None:
    """seq's output now, or None when its output_kind has nothing to say yet."""
    kind = seq.params.output_kind
    if kind == "final_only" and not seq.finished:
        return None
    if kind == "delta" and not seq.finished and seq.sent_tokens == len(seq.output_token_ids):
        return None
    return request_output(seq)


def request_output(seq: Sequence) -> RequestOutput:
    seq.metrics.num_output_tokens = len(seq.output_token_ids)
    text = seq.detokenizer.stable_text(seq.finished) if seq.detokenizer is not None else ""
    tokens, logprobs = seq.output_token_ids, seq.output_logprobs if seq.params.logprobs is not None else None
    if seq.params.output_kind == "delta":
        text, tokens = text[seq.sent_text:], tokens[seq.sent_tokens:]
        logprobs = logprobs[seq.sent_tokens:] if logprobs is not None else None
        seq.sent_text += len(text)
        seq.sent_tokens += len(tokens)
    completion = CompletionOutput(0, text, list(tokens), seq.cumulative_logprob,
                                  list(logprobs) if logprobs is not None else None,
                                  seq.finish_reason, seq.stop_reason, seq.error)
    return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], seq.finished,
                         seq.lora_request, seq.metrics)
