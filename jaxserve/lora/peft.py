"""Load and validate PEFT LoRA adapter folders into host (numpy) memory.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` as written by
``PeftModel.save_pretrained``. Loading is a pure function: it either returns a complete, immutable
:class:`PeftAdapter` or raises :class:`AdapterError`; it never caches or registers anything.

PEFT semantics reproduced here (checked against peft 0.21's source):

* ``target_modules`` as a list: a module is targeted when its full path equals an entry or ends with
  ``"." + entry`` (``tuners_utils.check_target_module_exists``). As a string: ``re.fullmatch`` of the
  string against the full module path (``other.match_target_against_key``), except the
  case-insensitive keyword ``"all-linear"``, which selects every Linear layer but the output head.
  Full module paths are those of ``LlamaForCausalLM.named_modules()``, e.g.
  ``model.layers.0.self_attn.q_proj``.
* ``exclude_modules``: string -> fullmatch; list -> equality or dotted-suffix match.
* ``layers_to_transform`` / ``layers_pattern``: only with a list ``target_modules``; the layer index
  is the first ``<name>.<digits>.`` segment (or ``<layers_pattern>.<digits>.``).
* ``rank_pattern`` / ``alpha_pattern``: the first key (in file order) for which
  ``re.match(rf"(.*\\.)?({key})$", module_path)`` succeeds supplies the value
  (``other.get_pattern_key``); otherwise ``r`` / ``lora_alpha``.
* scaling = alpha / r, or alpha / sqrt(r) with ``use_rslora`` (``lora.layer.update_layer``), using
  the pattern-resolved r and alpha.
* tensor names: ``base_model.model.<module path>.lora_A.weight`` ([r, in]) and ``...lora_B.weight``
  ([out, r]); the adapter-name segment (``lora_A.default.weight``) and a missing ``.weight`` are
  accepted too.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from jaxserve.config import ATTN_MODULES, LORA_MODULES, MLP_MODULES, ModelConfig

__all__ = ["AdapterError", "LoRAWeights", "PeftAdapter", "load_peft_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"

# Full paths (in LlamaForCausalLM.named_modules()) of modules that exist in the base model but that
# this engine cannot adapt. A regex target_modules that selects one of them is rejected.
_UNSUPPORTED_BASE_PATHS = ("lm_head", "model.embed_tokens", "model.norm")

# Config switches that change what an adapter computes and that this engine does not implement.
_UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias on lora_B",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "layer_replication": "layer replication",
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
    "trainable_token_indices": "trainable tokens",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
}

# init_lora_weights values whose saved adapters only work on a base model PEFT modified in place.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")

_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

_TENSOR_RE = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.default)?(?:\.weight)?$")
_LAYER_PATH_RE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<parent>[A-Za-z0-9_]+)\.(?P<module>[A-Za-z0-9_]+)$")


class AdapterError(ValueError):
    """An adapter folder that cannot be served. ``str(e)`` names the folder, the problem and what is
    allowed."""

    def __init__(self, path: str, problem: str):
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return f"LoRA adapter {self.path}: {self.problem}"


@dataclasses.dataclass(frozen=True, eq=False)
class LoRAWeights:
    a: np.ndarray   # [rank, in_features] float32
    b: np.ndarray   # [rank, out_features] float32 = lora_B.T * scaling
    scaling: float  # already folded into b

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class PeftAdapter:
    path: str
    weights: dict[tuple[int, str], LoRAWeights]
    max_rank: int
    target_modules: tuple[str, ...]
    nbytes: int


def _module_path(layer: int, module: str) -> str:
    parent = "self_attn" if module in ATTN_MODULES else "mlp"
    return f"model.layers.{layer}.{parent}.{module}"


def _supported() -> str:
    return ", ".join(LORA_MODULES)


class _Loader:
    def __init__(self, path: Any, cfg: ModelConfig, max_lora_rank: int):
        self.path = os.fspath(path)
        self.cfg = cfg
        self.max_lora_rank = max_lora_rank
        self.paths = {(layer, m): _module_path(layer, m)
                      for layer in range(cfg.num_layers) for m in LORA_MODULES}

    def fail(self, problem: str) -> AdapterError:
        return AdapterError(self.path, problem)

    # ---------------------------------------------------------------- config
    def read_config(self) -> dict:
        if not os.path.isdir(self.path):
            what = "is not a folder" if os.path.exists(self.path) else "does not exist"
            raise self.fail(f"adapter path {what}; expected a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
        cfg_file = os.path.join(self.path, CONFIG_NAME)
        if not os.path.isfile(cfg_file):
            raise self.fail(f"missing {CONFIG_NAME}; a PEFT adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            with open(cfg_file, "rb") as f:
                conf = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise self.fail(f"{CONFIG_NAME} is not valid JSON ({e}); expected a PEFT LoraConfig JSON object") from None
        if not isinstance(conf, dict):
            raise self.fail(f"{CONFIG_NAME} is not valid: top level is {type(conf).__name__}; expected a JSON object")
        return conf

    def check_config(self, conf: dict) -> None:
        peft_type = conf.get("peft_type")
        if peft_type != "LORA":
            raise self.fail(f"peft_type {peft_type!r} is not supported; allowed: 'LORA'")
        for key, what in _UNSUPPORTED_FEATURES.items():
            val = conf.get(key)
            if val not in (None, False, [], {}, ""):
                raise self.fail(f"{key}={val!r} ({what}) is not supported; allowed: {key} unset/null/false/empty")
        bias = conf.get("bias", "none")
        if bias != "none":
            raise self.fail(f"bias={bias!r} is not supported (it trains base-model biases); allowed: 'none'")
        init = conf.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
            raise self.fail(
                f"init_lora_weights={init!r} adapters need a base model modified by PEFT; allowed: adapters "
                f"saved with init_lora_weights true/false/gaussian/eva (convert PiSSA/OLoRA/CorDA/LoRA-GA with "
                f"path_initial_model_for_weight_conversion)")

    def positive_int(self, value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(f"{what}={value!r} is not valid; allowed: a positive integer")
        return value

    def number(self, value: Any, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(f"{what}={value!r} is not valid; allowed: a finite number")
        return float(value)

    def pattern_dict(self, conf: dict, key: str, value_fn) -> list[tuple[str, Any]]:
        d = conf.get(key) or {}
        if not isinstance(d, dict):
            raise self.fail(f"{key}={d!r} is not valid; allowed: an object mapping module-name patterns to values")
        out = []
        for k, v in d.items():
            try:
                rx = re.compile(rf"(.*\.)?({k})$")
            except re.error as e:
                raise self.fail(f"{key} key {k!r} is not a valid regex ({e}); allowed: a module name or regex") from None
            out.append((rx, value_fn(v, f"{key}[{k!r}]")))
        return out

    # ---------------------------------------------------------------- targeting
    def targeted(self, conf: dict) -> set[tuple[int, str]]:
        tm = conf.get("target_modules")
        exclude = conf.get("exclude_modules")
        ltt = conf.get("layers_to_transform")
        lp = conf.get("layers_pattern")
        if tm is None or tm == [] or tm == "":
            raise self.fail(f"target_modules is empty; allowed: a list of module names from {_supported()}, "
                            f"a regex string, or 'all-linear'")
        if isinstance(tm, str):
            if ltt is not None or lp is not None:
                raise self.fail("layers_to_transform/layers_pattern cannot be used with a string target_modules; "
                                "allowed: a list target_modules with layers_to_transform")
            if tm.lower() == ALL_LINEAR:
                chosen = set(self.paths)
            else:
                try:
                    rx = re.compile(tm)
                except re.error as e:
                    raise self.fail(f"target_modules regex {tm!r} is invalid ({e}); allowed: a Python regex "
                                    f"matched in full against module paths like model.layers.0.self_attn.q_proj") from None
                bad = [p for p in _UNSUPPORTED_BASE_PATHS if rx.fullmatch(p)]
                if bad:
                    raise self.fail(f"target_modules regex {tm!r} selects {', '.join(bad)}, which cannot be "
                                    f"adapted; supported target modules: {_supported()}")
                chosen = {k for k, p in self.paths.items() if rx.fullmatch(p)}
                if not chosen:
                    raise self.fail(f"target_modules regex {tm!r} matches no module of the base model; it must "
                                    f"fully match paths like model.layers.0.self_attn.q_proj; supported target "
                                    f"modules: {_supported()}")
        elif isinstance(tm, list) and all(isinstance(t, str) for t in tm):
            for t in tm:
                if not any(p == t or p.endswith("." + t) for p in self.paths.values()):
                    raise self.fail(f"target module {t!r} does not exist in the base model (or cannot be adapted); "
                                    f"supported target modules: {_supported()}")
            chosen = {k for k, p in self.paths.items() if any(p == t or p.endswith("." + t) for t in tm)}
            chosen = self.filter_layers(chosen, ltt, lp)
        else:
            raise self.fail(f"target_modules={tm!r} is not valid; allowed: a list of module names from "
                            f"{_supported()}, a regex string, or 'all-linear'")
        if exclude:
            if isinstance(exclude, str):
                try:
                    ex = re.compile(exclude)
                except re.error as e:
                    raise self.fail(f"exclude_modules regex {exclude!r} is invalid ({e}); allowed: a Python regex") from None
                chosen = {k for k in chosen if not ex.fullmatch(self.paths[k])}
            elif isinstance(exclude, list) and all(isinstance(t, str) for t in exclude):
                chosen = {k for k in chosen
                          if not any(self.paths[k] == t or self.paths[k].endswith("." + t) for t in exclude)}
            else:
                raise self.fail(f"exclude_modules={exclude!r} is not valid; allowed: a list of module names or a regex string")
        return chosen

    def filter_layers(self, chosen: set, ltt: Any, lp: Any) -> set:
        if lp not in (None, "", []) and ltt is None:
            raise self.fail("layers_pattern is set without layers_to_transform; allowed: both, or only layers_to_transform")
        if ltt is None or ltt == []:
            return chosen
        if isinstance(ltt, int) and not isinstance(ltt, bool):
            wanted = {ltt}
        elif isinstance(ltt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ltt):
            wanted = set(ltt)
        else:
            raise self.fail(f"layers_to_transform={ltt!r} is not valid; allowed: an integer or a list of integers")
        if lp in (None, "", []):
            idx_res = [re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")]
        elif isinstance(lp, str) or (isinstance(lp, list) and all(isinstance(p, str) for p in lp)):
            idx_res = [re.compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in ([lp] if isinstance(lp, str) else lp)]
        else:
            raise self.fail(f"layers_pattern={lp!r} is not valid; allowed: a string or a list of strings")
        out = set()
        for k in chosen:
            for rx in idx_res:
                m = rx.match(self.paths[k])
                if m:
                    if int(m.group("idx")) in wanted:
                        out.add(k)
                    break
        if not out:
            raise self.fail(f"layers_to_transform={ltt!r} selects no layer of the base model; allowed: layer "
                            f"indices 0..{self.cfg.num_layers - 1}")
        return out

    # ---------------------------------------------------------------- tensors
    def read_tensors(self) -> dict[tuple[int, str], dict[str, np.ndarray]]:
        wfile = os.path.join(self.path, WEIGHTS_NAME)
        if not os.path.isfile(wfile):
            has_bin = os.path.isfile(os.path.join(self.path, "adapter_model.bin"))
            extra = (" (found adapter_model.bin: PyTorch pickle weights are not supported)" if has_bin else "")
            raise self.fail(f"missing {WEIGHTS_NAME}{extra}; allowed: safetensors weights only "
                            f"(adapter_model.bin is not supported; re-save with safe_serialization=True)")
        try:
            with safe_open(wfile, framework="numpy") as f:
                names = {}
                for name in f.keys():
                    key, ab = self.classify(name)
                    slot = names.setdefault(key, {})
                    if ab in slot:
                        raise self.fail(f"tensor {name!r} duplicates {slot[ab]!r}; allowed: one lora_{ab} per module")
                    slot[ab] = name
                if not names:
                    raise self.fail(f"{WEIGHTS_NAME} holds no LoRA tensors; expected lora_A/lora_B weights for "
                                    f"{_supported()}")
                out = {}
                for key in sorted(names, key=lambda k: (k[0], LORA_MODULES.index(k[1]))):
                    slot = names[key]
                    for ab, other in (("A", "B"), ("B", "A")):
                        if other not in slot:
                            raise self.fail(f"tensor {slot[ab]!r} has no lora_{other} partner; every adapted "
                                            f"module needs both lora_A and lora_B")
                    out[key] = {ab: self.load_tensor(f, slot[ab]) for ab in "AB"}
                return out
        except (SafetensorError, OSError) as e:
            raise self.fail(f"cannot read {WEIGHTS_NAME}, corrupt or truncated ({e}); expected a safetensors "
                            f"file") from None

    def load_tensor(self, f, name: str) -> np.ndarray:
        view = f.get_slice(name)
        if view.get_dtype() not in _FLOAT_DTYPES:
            raise self.fail(f"tensor {name!r} has dtype {view.get_dtype()!r}; allowed: {', '.join(_FLOAT_DTYPES)}")
        if len(view.get_shape()) != 2:
            raise self.fail(f"tensor {name!r} has shape {tuple(view.get_shape())}; allowed: a 2-D matrix")
        return f.get_tensor(name)

    def classify(self, name: str) -> tuple[tuple[int, str], str]:
        m = _TENSOR_RE.match(name)
        if not m:
            raise self.fail(f"unexpected tensor {name!r}; allowed: only lora_A/lora_B weights of {_supported()}")
        path = m.group("path")
        rest = path[len("base_model.model."):] if path.startswith("base_model.model.") else path
        lm = _LAYER_PATH_RE.match(rest if rest.startswith("model.") else "model." + rest)
        if lm is None:
            module = path.rsplit(".", 1)[-1]
            raise self.fail(f"tensor {name!r} adapts module {module!r}, which the base model lacks or cannot be "
                            f"adapted; supported target modules: {_supported()}")
        layer, parent, module = int(lm.group("layer")), lm.group("parent"), lm.group("module")
        expected_parent = "self_attn" if module in ATTN_MODULES else "mlp" if module in MLP_MODULES else None
        if expected_parent is None or parent != expected_parent:
            raise self.fail(f"tensor {name!r} adapts module {parent}.{module}, which the base model lacks; "
                            f"supported target modules: {_supported()} (under self_attn/mlp)")
        if layer >= self.cfg.num_layers:
            raise self.fail(f"tensor {name!r} is for layer {layer} but the base model has {self.cfg.num_layers} "
                            f"layers; allowed layers: 0..{self.cfg.num_layers - 1}")
        return (layer, module), m.group("ab")

    # ---------------------------------------------------------------- main
    def load(self) -> PeftAdapter:
        if isinstance(self.max_lora_rank, bool) or not isinstance(self.max_lora_rank, int) or self.max_lora_rank <= 0:
            raise self.fail(f"max_lora_rank={self.max_lora_rank!r} is not valid; allowed: a positive integer")
        conf = self.read_config()
        self.check_config(conf)
        r = self.positive_int(conf.get("r"), "r")
        alpha = self.number(conf.get("lora_alpha", 8), "lora_alpha")
        use_rslora = conf.get("use_rslora", False)
        if not isinstance(use_rslora, bool):
            raise self.fail(f"use_rslora={use_rslora!r} is not valid; allowed: true or false")
        rank_pattern = self.pattern_dict(conf, "rank_pattern", self.positive_int)
        alpha_pattern = self.pattern_dict(conf, "alpha_pattern", self.number)
        chosen = self.targeted(conf)
        tensors = self.read_tensors()

        weights: dict[tuple[int, str], LoRAWeights] = {}
        for key, pair in tensors.items():
            layer, module = key
            path = self.paths[key]
            where = f"layer {layer} {module}"
            if key not in chosen:
                raise self.fail(f"has tensors for {where} ({path}), which adapter_config.json's target_modules "
                                f"does not select; allowed: tensors only for targeted modules")
            a, b = pair["A"], pair["B"]
            in_f, out_f = self.cfg.module_shape(module)
            if a.shape[1] != in_f:
                raise self.fail(f"lora_A of {where} has shape {a.shape}, but the base model's {module} has "
                                f"in_features {in_f}; allowed: [rank, {in_f}]")
            if b.shape[0] != out_f:
                raise self.fail(f"lora_B of {where} has shape {b.shape}, but the base model's {module} has "
                                f"out_features {out_f}; allowed: [{out_f}, rank]")
            if a.shape[0] != b.shape[1]:
                raise self.fail(f"lora_A {a.shape} and lora_B {b.shape} of {where} have different ranks "
                                f"({a.shape[0]} vs {b.shape[1]}); allowed: lora_A [r, in] with lora_B [out, r]")
            rank = a.shape[0]
            exp_r = next((v for rx, v in rank_pattern if rx.match(path)), r)
            mod_alpha = next((v for rx, v in alpha_pattern if rx.match(path)), alpha)
            if rank != exp_r:
                raise self.fail(f"rank of {where} is {rank} but adapter_config.json says {exp_r} "
                                f"(r/rank_pattern); allowed: tensors whose rank matches r/rank_pattern")
            if rank > self.max_lora_rank:
                raise self.fail(f"rank {rank} of {where} exceeds max_lora_rank {self.max_lora_rank}; allowed: "
                                f"rank <= {self.max_lora_rank} (raise max_lora_rank to serve it)")
            scaling = mod_alpha / math.sqrt(rank) if use_rslora else mod_alpha / rank
            with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported below
                a32 = a.astype(np.float32)
                b32 = (b.astype(np.float64).T * scaling).astype(np.float32)
            for label, arr in (("lora_A", a32), ("lora_B", b32)):
                if not np.isfinite(arr).all():
                    raise self.fail(f"{label} of {where} holds NaN/inf values (after scaling by {scaling:g} in "
                                    f"float32); allowed: finite weights")
                arr.flags.writeable = False
            weights[key] = LoRAWeights(a=a32, b=b32, scaling=float(scaling))

        return PeftAdapter(
            path=self.path,
            weights=weights,
            max_rank=max(w.rank for w in weights.values()),
            target_modules=tuple(sorted({m for _, m in weights})),
            nbytes=sum(w.a.nbytes + w.b.nbytes for w in weights.values()),
        )


def load_peft_adapter(path, model_config: ModelConfig, max_lora_rank: int) -> PeftAdapter:
    """Read a PEFT LoRA adapter folder into float32 host arrays, validated against ``model_config``.

    Returns a :class:`PeftAdapter` whose ``weights[(layer, module)]`` hold ``a`` [rank, in] and
    ``b`` [rank, out] with the LoRA scaling folded into ``b``, so that the adapter's contribution
    to a projection is ``(x @ a.T) @ b``. Raises :class:`AdapterError` for anything this engine
    cannot serve exactly as PEFT would.
    """
    return _Loader(path, model_config, max_lora_rank).load()
