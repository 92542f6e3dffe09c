"""Option fields: a dataclass field with its help text, so each default and its help are written once
(arm_int4.options builds the command-line parsers from them; library settings such as
quantize.options.QuantizeOptions use them too, without importing the command layer).
No `from __future__ import annotations` in modules using these: argparse-dataclass reads real types.
"""

from dataclasses import field

__all__ = ["opt", "positional", "vllm_args"]


def opt(default, help, **meta):
    """A field with its help text; list defaults are copied per instance."""
    if isinstance(default, list):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata=dict(help=help, **meta))
    return field(default=default, metadata=dict(help=help, **meta))


def positional(name, help, **meta):
    return field(metadata=dict(args=[name], help=help, **meta))


def vllm_args(help):
    """The words after `--` on a command that starts vLLM (cli.parse puts them here; argparse sees none)."""
    return opt(None, help, args=["vllm_args"], nargs="*", type=str, metavar="VLLM_ARG")
