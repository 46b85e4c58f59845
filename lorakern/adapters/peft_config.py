"""PEFT's ``adapter_config.json`` (``LoraConfig``): what each field means to lorakern, in one place.

Every field of PEFT's ``LoraConfig`` (peft 0.17-0.21) is listed in :data:`FIELDS` with how lorakern
treats a non-default value:

* ``"ok"``: it does not change the adapter's forward once the weights are saved (metadata, which
  modules were targeted, initialisation that leaves the base model alone, dropout, ...), or
  lorakern implements it (``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``,
  ``use_qalora`` with ``qalora_group_size``: :mod:`lorakern.adapters.qalora`);
* a string: the name of the PEFT feature that changes the math and that lorakern does not
  implement; an adapter that uses it is refused by :func:`check_config` with that name.

A field not listed here (a newer PEFT's feature) is refused when its value is not a default-like
value (``None``, ``False``, ``{}``, ``[]``): lorakern cannot know whether it changes the math.

:func:`pattern_key` is PEFT's ``get_pattern_key``: every key of ``rank_pattern`` / ``alpha_pattern``
is a regular expression that must match the end of the module name at a dot boundary
(``re.match(rf"(.*\\.)?({key})$", name)``); the first matching key in the dict's order wins.
"""
from __future__ import annotations

import re

from ..formats.io import FormatError

__all__ = ["FIELDS", "BASE_MODIFYING_INITS", "LORAKERN_METADATA_KEYS", "check_config", "pattern_key",
           "pattern_value", "target_matches"]

OK = "ok"

# field -> "ok" or the PEFT feature it turns on (refused when the value is not the default)
FIELDS: dict[str, str] = {
    # bookkeeping
    "task_type": OK, "peft_type": OK, "auto_mapping": OK, "peft_version": OK, "base_model_name_or_path": OK,
    "revision": OK, "inference_mode": OK, "runtime_config": OK,
    # what lorakern implements
    "r": OK, "lora_alpha": OK, "use_rslora": OK, "rank_pattern": OK, "alpha_pattern": OK,
    "use_qalora": OK,  # QA-LoRA: group-pooled inputs (lorakern.adapters.qalora)
    # targeting (the saved tensors already say which modules carry an adapter)
    "target_modules": OK, "exclude_modules": OK, "layers_to_transform": OK, "layers_pattern": OK,
    # training only / initialisation that leaves the base weights alone (checked in check_config)
    "lora_dropout": OK, "init_lora_weights": OK, "eva_config": OK, "loftq_config": OK, "corda_config": OK,
    "lora_ga_config": OK, "fan_in_fan_out": OK, "ensure_weight_tying": OK, "qalora_group_size": OK,
    "megatron_core": OK,
    # features that change the forward: refused by name
    "use_dora": "DoRA (weight-decomposed LoRA, use_dora=True)",
    "alora_invocation_tokens": "activated LoRA (aLoRA: the adapter acts only from its invocation tokens on)",
    "lora_bias": "a bias on lora_B (lora_bias=True)",
    "bias": "trained base-layer biases (bias='all' or 'lora_only')",
    "modules_to_save": "modules_to_save (full copies of whole modules trained with the adapter)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices: embedding rows trained with the adapter)",
    "layer_replication": "layer replication (layer_replication: the adapter duplicates decoder layers)",
    "target_parameters": "LoRA on nn.Parameter tensors (target_parameters, e.g. MoE expert weights)",
    "megatron_config": "Megatron-LM parallel LoRA layers (megatron_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing over several adapters (arrow_config)",
    "kasa_config": "KaSA (kasa_config: singular-value-adapted LoRA)",
    "monteclora_config": "MonteCLoRA (monteclora_config: a stochastic mixture of LoRA samples)",
    "velora_config": "VeLoRA (velora_config)",
}

# init_lora_weights values whose initialisation rewrites the base layer's weight (PiSSA, OLoRA, CorDA,
# LoftQ, LoRA-GA, MiCA): PEFT redoes that rewrite when it loads the adapter, so the adapter is relative to a
# modified base and cannot be applied to the plain model.
BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")
SAFE_INITS = (True, False, "gaussian", "orthogonal", "eva")

# metadata earlier lorakern versions wrote into adapter_config.json; now in the safetensors metadata
LORAKERN_METADATA_KEYS = ("lorakern_task", "lorakern_description")


def _default_like(v) -> bool:
    return v is None or v is False or v == {} or v == [] or v == ""


def check_config(cfg: dict, where: str) -> None:
    """Refuse, by the PEFT feature's name, every config value whose math lorakern does not implement.

    Raises:
        FormatError: naming the field, its value and the PEFT feature.
    """
    for key, v in cfg.items():
        if key in LORAKERN_METADATA_KEYS:
            continue
        kind = FIELDS.get(key)
        if kind is None:
            if not _default_like(v):
                raise FormatError(f"{where}: unknown adapter_config field {key!r} = {v!r}: a PEFT feature lorakern "
                                  "does not know (it may change the adapter's math), so the adapter is refused")
            continue
        if kind == OK:
            continue
        default = "none" if key == "bias" else None
        if v == default or (default is None and _default_like(v)):
            continue
        raise FormatError(f"{where}: {key}={v!r}: the adapter uses {kind}, which lorakern does not support")
    init = cfg.get("init_lora_weights", True)
    if init not in SAFE_INITS:
        name = init.lower() if isinstance(init, str) else init
        if isinstance(name, str) and name.startswith(BASE_MODIFYING_INITS):
            raise FormatError(f"{where}: init_lora_weights={init!r}: this initialisation rewrites the base model's "
                              "weights, and PEFT redoes that when it loads the adapter; lorakern applies adapters to "
                              "the unmodified base. Save the adapter with PEFT's "
                              "path_initial_model_for_weight_conversion to turn it into a plain LoRA")
        raise FormatError(f"{where}: init_lora_weights={init!r} is not an initialisation lorakern knows")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict) or not all(isinstance(k, str) and isinstance(x, (int, float)) and x > 0
                                                  for k, x in pat.items()):
            raise FormatError(f"{where}: {key} must map module-name patterns to positive numbers, got {pat!r}")
        for k in pat:
            try:
                re.compile(k)
            except re.error as e:
                raise FormatError(f"{where}: {key} key {k!r} is not a regular expression ({e})") from None


def pattern_key(keys, module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key (a regex) matching the end of ``module`` at a dot boundary."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def pattern_value(pattern: dict | None, module: str, default):
    """``pattern[pattern_key(pattern, module)]``, or ``default`` when no key matches (PEFT's rule)."""
    key = pattern_key((pattern or {}).keys(), module)
    return default if key is None else pattern[key]


def target_matches(target_modules, module: str) -> bool:
    """PEFT's ``check_target_module_exists`` for ``target_modules``: a string is a full-name regex,
    a list matches a module whose name is an item or ends with ``"." + item``."""
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)
