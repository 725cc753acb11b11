"""What a step sends to the device, with names. Each host-to-device transfer costs tens of
microseconds, so a step packs its batch into two int32 arrays and its sampler inputs into two;
these registered pytrees name the parts, and their packing (host) and unpacking (inside the jit)
sit here, so no other code reads a row or a column by its number.

- `PackedBatch(tokens, seqs)`: tokens [7, T] holds TOKEN_FIELDS (llama.Batch's per-token
  fields) row by row; seqs [S, max_pages + 1] holds the page tables with the logits index of
  row i in the last column. `unpack()` gives the `llama.Batch`.
- `SamplerInputs(floats, ints)`: floats [N, 2] = temperature, top_p; ints [N, 4] = top_k, seed
  low, seed high (the uint32 halves' bits), step. Packed from a host `SamplerTable` [S, 7]
  float64 whose columns are SAMPLER_FIELDS: a request's fixed inputs (`sampling_row`) + its step.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class TokenRows(NamedTuple):
    """The per-token rows of a PackedBatch, in their packed order."""
    token_ids: np.ndarray
    positions: np.ndarray
    token_seq: np.ndarray      # the token's sequence: a row of the page tables (its slot)
    slot_mapping: np.ndarray   # flat pool slot its KV goes to; -1: padding, write nowhere
    lora_ids: np.ndarray       # its adapter among the batch's active ones; -1: none
    prev_rows: np.ndarray      # row of the previous step's samples holding it; -1: token_ids has it
    cached_lens: np.ndarray    # tokens of its sequence already in the pool


TOKEN_FIELDS = TokenRows._fields
_PADDING = TokenRows(0, 0, 0, -1, -1, -1, 0)


@partial(jax.tree_util.register_dataclass, data_fields=["tokens", "seqs"], meta_fields=[])
@dataclasses.dataclass
class PackedBatch:
    tokens: np.ndarray   # [len(TOKEN_FIELDS), T] int32
    seqs: np.ndarray     # [S, max_pages + 1] int32

    @classmethod
    def empty(cls, num_tokens: int, num_seqs: int, max_pages: int) -> "PackedBatch":
        """All padding: tokens that write nowhere, use no adapter and read no previous sample."""
        tokens = np.empty((len(TOKEN_FIELDS), num_tokens), np.int32)
        tokens[:] = np.array(_PADDING, np.int32)[:, None]
        return cls(tokens, np.zeros((num_seqs, max_pages + 1), np.int32))

    def rows(self) -> TokenRows:
        """Named views of the token rows (on the host: write into them to fill the batch)."""
        return TokenRows(*self.tokens)

    @property
    def page_tables(self):
        return self.seqs[:, :-1]

    @property
    def logits_indices(self):
        return self.seqs[:, -1]

    def unpack(self):
        """The llama.Batch (inside the jit)."""
        from jaxserve.model.llama import Batch
        return Batch(page_tables=self.page_tables, logits_indices=self.logits_indices, **self.rows()._asdict())


# A request's sampler inputs, fixed for its life (Sequence.sampling_row), then its step.
SAMPLER_FIELDS = ("temperature", "top_p", "top_k", "seed_low", "seed_high", "logprobs", "step")
COLUMN = {name: i for i, name in enumerate(SAMPLER_FIELDS)}


def sampling_row(temperature: float, top_p: float, top_k: int, seed: int, logprobs: int | None) -> tuple:
    """SAMPLER_FIELDS but the step; logprobs -1 when none are wanted."""
    return (temperature, top_p, top_k, seed & 0xFFFFFFFF, seed >> 32, -1 if logprobs is None else logprobs)


def sampler_table(num_rows: int) -> np.ndarray:
    """A host table of SAMPLER_FIELDS columns; padding rows are greedy without filters."""
    table = np.zeros((num_rows, len(SAMPLER_FIELDS)), np.float64)
    table[:, COLUMN["top_p"]], table[:, COLUMN["top_k"]], table[:, COLUMN["logprobs"]] = 1.0, -1, -1
    return table


@partial(jax.tree_util.register_dataclass, data_fields=["floats", "ints"], meta_fields=[])
@dataclasses.dataclass
class SamplerInputs:
    floats: np.ndarray   # [N, 2] float32: temperature, top_p
    ints: np.ndarray     # [N, 4] int32: top_k, seed low, seed high (bits), step

    @classmethod
    def pack(cls, table: np.ndarray) -> "SamplerInputs":
        ints = np.empty((len(table), 4), np.int32)
        ints[:, 0], ints[:, 3] = table[:, COLUMN["top_k"]], table[:, COLUMN["step"]]
        ints[:, 1:3] = table[:, COLUMN["seed_low"]:COLUMN["seed_high"] + 1].astype(np.uint32).view(np.int32)
        return cls(table[:, COLUMN["temperature"]:COLUMN["top_p"] + 1].astype(np.float32), ints)

    def __getitem__(self, rows) -> "SamplerInputs":
        return SamplerInputs(self.floats[rows], self.ints[rows])

    def unpack(self) -> tuple:
        """(temperature, top_p, top_k, seeds [N, 2] uint32, steps) inside the jit."""
        seeds = jax.lax.bitcast_convert_type(self.ints[:, 1:3], jnp.uint32)
        return self.floats[:, 0], self.floats[:, 1], self.ints[:, 0], seeds, self.ints[:, 3]
