"""Integrations with inference stacks (vLLM). Each imports its stack lazily: lorakern never needs them."""
