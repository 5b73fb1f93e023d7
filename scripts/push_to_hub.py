"""Push the output folder of a finished distillation run to the Hugging Face Hub.

    python scripts/push_to_hub.py --output_dir outputs/date_demo --hub_model_id your-name/date-student

Pushes the student, its tokenizer, the model card (README.md), the report, its plots and results.json, in one commit
(see kd_llm.hub.PUSH_ALLOW_PATTERNS); never the teacher, projections, checkpoints, optimizer states or the token.
The token comes from HF_TOKEN or `hf auth login` (safer than --hub_token, which other users can see in `ps`).
"""

from __future__ import annotations

import logging

from kd_llm.boundary import run_script
from kd_llm.cli import ScriptParser
from kd_llm.hub import PushResult, push_output_folder


def main(argv: list[str] | None = None) -> PushResult:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="The run's output folder (holds config.json etc.).")
    parser.add_argument("--hub_model_id", required=True, help="Repository to push to: namespace/name.")
    parser.add_argument("--hub_private_repo", action="store_true", help="Create the repository private.")
    parser.add_argument("--hub_revision", default=None, help="Branch to push to (default: main).")
    parser.add_argument("--commit_message", default=None, help="Commit message.")
    parser.add_argument("--hub_token", default=None, help="Token; prefer HF_TOKEN or `hf auth login`.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = push_output_folder(args.output_dir, args.hub_model_id, token=args.hub_token,
                                private=args.hub_private_repo or None, revision=args.hub_revision,
                                commit_message=args.commit_message)
    print(f"Pushed {len(result.files)} files to {result.repo_id}: {result.commit_url}")
    return result


if __name__ == "__main__":
    run_script(main, "push_to_hub")
