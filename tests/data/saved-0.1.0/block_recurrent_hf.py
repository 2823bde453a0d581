"""Lets transformers load this directory with trust_remote_code=True."""
from blockrecurrent.hf import BlockRecurrentForCausalLM, BlockRecurrentHFConfig
