"""SamplingParams (vLLM's names and meanings) and the on-device sampler."""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

MAX_LOGPROBS = 20  # like vLLM's default max_logprobs
OUTPUT_KINDS = ("cumulative", "delta", "final_only")


@dataclasses.dataclass
class SamplingParams:
    """temperature 0 is greedy; top_k -1 (or 0) and top_p 1 disable those filters; seed makes a
    request's sampling reproducible whatever else is in the batch; logprobs=N returns, for each
    generated token, a dict token_id -> logprob of the N most likely tokens plus the sampled one
    (log-probabilities of the model's raw distribution, before temperature and filters).
    output_kind (vLLM's RequestOutputKind): "cumulative" — each engine output holds everything so
    far; "delta" — only what is new since the last output (streaming); "final_only" — one output
    when the request finishes."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    output_kind: str = "cumulative"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Normalize (a str stop -> [stop], numpy scalars -> Python numbers, top_k 0 -> -1) and
        check every field; the engine calls it again at add_request, since a dataclass can be
        changed after construction."""
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"SamplingParams.stop={self.stop!r} is invalid; allowed: a non-empty string or a list "
                             f"of them")
        self.stop = list(self.stop)
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"SamplingParams.stop_token_ids={self.stop_token_ids!r} is invalid; allowed: a list of "
                             f"token ids >= 0")
        self.stop_token_ids = list(self.stop_token_ids or [])
        # numpy scalars (np.float32(0.5), np.int64(3)) are numbers too: keep plain Python ones.
        for name, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("seed", int),
                           ("max_tokens", int), ("logprobs", int)):
            value = getattr(self, name)
            numpy_kind = np.floating if kind is float else np.integer
            if isinstance(value, np.generic) and np.issubdtype(value.dtype, numpy_kind):
                setattr(self, name, kind(value))
        if self.top_k == 0:
            self.top_k = -1
        self._validate()

    def _validate(self):
        def bad(name, allowed):
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")

        if self.n != 1:
            bad("n", "1 (several completions per prompt are not supported yet)")
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature):
            bad("temperature", "a number >= 0 (0 means greedy)")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            bad("top_p", "a number in (0, 1]")
        if not (isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1)):
            bad("top_k", "-1 or 0 (disabled) or an integer >= 1")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            bad("seed", "None or an integer in [0, 2**63)")
        if self.max_tokens is not None and not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            bad("max_tokens", "None or an integer >= 1")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "a non-empty string or a list of them")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "a list of token ids >= 0")
        if self.output_kind not in OUTPUT_KINDS:
            bad("output_kind", ", ".join(OUTPUT_KINDS))
        if self.logprobs is not None and not (isinstance(self.logprobs, int)
                                              and 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")


# Static sampler variants, cheapest first: "greedy" (no row samples: no random draw at all, which
# on CPU costs more than the argmax — a draw over the vocabulary for every row), "random" (some row
# samples, no row filters), "filtered" (some row uses top-k or top-p: the vocabulary sort).
SAMPLER_MODES = ("greedy", "random", "filtered")


def sampler_mode(temperature, top_k, top_p) -> str:
    """The cheapest SAMPLER_MODES entry that serves rows with these (host numpy) parameters."""
    sampling = temperature > 0
    if not sampling.any():
        return "greedy"
    # A greedy row's top-k/top-p changes nothing: only sampling rows' filters need the sort.
    return "filtered" if (sampling & ((top_k > 0) | (top_p < 1.0))).any() else "random"


@partial(jax.jit, static_argnames=("num_logprobs", "mode"))
def sample(logits, temperature, top_k, top_p, seeds, steps, num_logprobs: int = 0, mode: str = "filtered"):
    """Sample one token per row, on device.

    logits [N, V] float32; temperature, top_p [N] float32; top_k [N] int32 (-1: off);
    seeds [N, 2] uint32 (a request's 64-bit seed) and steps [N] int32 (its output length so far):
    each row draws from its own key, so a request's tokens never depend on its neighbours.
    mode (static, one of SAMPLER_MODES) skips the work no row needs; a row gets the same token in
    every mode that serves it.
    Returns (tokens [N], sampled token's logprob [N], top ids [N, k], top logprobs [N, k]).
    """
    if mode not in SAMPLER_MODES:
        raise ValueError(f"mode={mode!r} is invalid; allowed: {', '.join(SAMPLER_MODES)}")
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1)
    if mode == "greedy":
        tokens = greedy.astype(jnp.int32)
    else:
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(s[0]), s[1]), t))(
            seeds, steps)
        # Gumbel-max, the noise drawn in vocabulary order whatever the mode: a row without
        # filters gets the same token in "random" and "filtered" mode, so a seeded request's
        # tokens do not depend on whether a neighbour in the batch uses top-k or top-p.
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        noisy = scaled + jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:]))(keys)
        if mode == "filtered":
            # Filters work on the logits sorted in descending order (rank 0 is always kept).
            order = jnp.argsort(-logits, axis=-1)
            sorted_scaled = jnp.take_along_axis(scaled, order, axis=-1)
            rank = jnp.arange(logits.shape[-1])[None, :]
            keep = (top_k[:, None] < 0) | (rank < top_k[:, None])
            probs = jax.nn.softmax(jnp.where(keep, sorted_scaled, -jnp.inf), axis=-1)
            keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
            keep_by_token = jnp.zeros_like(keep).at[jnp.arange(keep.shape[0])[:, None], order].set(keep)
            noisy = jnp.where(keep_by_token, noisy, -jnp.inf)
        sampled = jnp.argmax(noisy, axis=-1)
        tokens = jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
    token_logprob = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, num_logprobs)
    return tokens, token_logprob, top_ids, top_logprobs


@partial(jax.jit, static_argnames=("num_logprobs", "mode", "pad_to"))
def sample_packed(logits, inputs, num_logprobs: int = 0, mode: str = "filtered", pad_to: int = 0):
    """`sample` with its per-row inputs packed (packed.SamplerInputs: two arrays, so a step sends
    two small arrays to the device instead of five). The tokens come back zero-padded to pad_to
    rows."""
    temperature, top_p, top_k, seeds, steps = inputs.unpack()
    tokens, *rest = sample(logits, temperature, top_k, top_p, seeds, steps, num_logprobs=num_logprobs, mode=mode)
    # The next step feeds pending decode tokens from these rows: one length for every step's
    # tokens (max_num_seqs) keeps the forward's input shape fixed whatever this step's row count.
    return (jnp.pad(tokens, (0, max(0, pad_to - tokens.shape[0]))), *rest)
