"""Score a model on a specialist skill (exact match per category and overall) and write the scores as JSON.

    python scripts/evaluate_skills.py --model outputs/date_demo --output outputs/date_demo/skills.json
    python scripts/evaluate_skills.py --model embedded:date-teacher --eval_size 1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kd_llm.boundary import run_script
from kd_llm.cli import ScriptParser, positive_int
from kd_llm.evaluation.skills import evaluate_skill
from kd_llm.models.loading import load_model, load_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="Model spec: folder, Hub id, .gguf file, packaged:<name> or embedded:<name>.")
    parser.add_argument("--task", default="date_arithmetic", help="Skill to score (date_arithmetic).")
    parser.add_argument("--eval_size", type=positive_int, default=500, help="Held-out problems to score.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the problem generator.")
    parser.add_argument("--max_new_tokens", type=positive_int, default=160, help="Generation budget per answer.")
    parser.add_argument("--batch_size", type=positive_int, default=100, help="Prompts generated together.")
    parser.add_argument("--no_chat_template", action="store_true", help="Give the raw prompt, without the template.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow custom modelling code.")
    parser.add_argument("--output", default=None, help="JSON file for the scores (default: print only).")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = load_model(args.model, trust_remote_code=args.trust_remote_code)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    scores = evaluate_skill(model, tokenizer, task=args.task, size=args.eval_size, seed=args.seed,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            use_chat_template=not args.no_chat_template, progress=True)
    scores = {"model": args.model, "task": args.task, **scores}
    text = json.dumps(scores, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    print(text)
    return scores


if __name__ == "__main__":
    run_script(main, "evaluate_skills")
