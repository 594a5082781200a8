"""Sample text from a trained language model (a model=transformer_lm run).

    python scripts/sample.py outputs/RUN_DIR "twenty" --max-new-tokens 20
    printf 'the third\nfour hundred\n' | python scripts/sample.py outputs/RUN_DIR --temperature 0.8 --top-k 10

Each prompt (the argument, else every line of stdin; an empty one samples from scratch) is continued until the
model ends its document or --max-new-tokens, and printed with its continuation, one line each. The same --seed
gives the same text; --top-k 1 or --temperature 0 is greedy. The run is loaded as scripts/translate.py loads it
(the file and step go to stderr), with the Polyak-averaged parameters unless --last-iterate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from data import DataError
from trainer.checkpoint import CheckpointError
from trainer.trained import load_trained


@torch.no_grad()
def sample(model, prompt: list[int], max_new_tokens: int, context: int, temperature: float, top_k: int | None,
           generator: torch.Generator, eos_id: int, banned: list[int]) -> list[int]:
    """The ids after ``prompt``, up to eos (not included) or ``max_new_tokens``. The model has no incremental
    decoding cache, so each step re-feeds the last ``context`` tokens: the longest window it was trained on."""
    ids, device = list(prompt), next(model.parameters()).device
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids[-context:]], device=device))[0, -1].float()
        logits[banned] = -float("inf")  # pad is never a target; bos only follows eos, where sampling stops
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                logits[logits < logits.topk(top_k).values[-1]] = -float("inf")
            next_id = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))
        if next_id == eos_id:
            break
        ids.append(next_id)
    return ids[len(prompt):]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory or checkpoint file")
    parser.add_argument("prompt", nargs="?", help="the text to continue (default: each line of stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, help="sample among the k likeliest tokens only (1: greedy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--last-iterate", action="store_true", help="the raw parameters, not the averaged ones")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.temperature < 0 or args.max_new_tokens < 0 or (args.top_k is not None and args.top_k < 1):
        parser.error("--temperature and --max-new-tokens must be >= 0, --top-k >= 1")

    try:
        trained = load_trained(args.run, "transformer_lm", last_iterate=args.last_iterate,
                               device=torch.device(args.device))
    except (CheckpointError, DataError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    print(trained.line, file=sys.stderr)
    tokenizer = trained.task.tokenizer
    context = min(trained.cfg.data.seq_len, trained.cfg.model.max_positions)
    generator = torch.Generator().manual_seed(args.seed)  # one stream for all prompts, in order
    prompts = [args.prompt] if args.prompt is not None else sys.stdin.read().splitlines()
    for prompt in prompts:
        ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]  # as every document starts in training
        new = sample(trained.model, ids, args.max_new_tokens, context, args.temperature, args.top_k, generator,
                     tokenizer.eos_id, [tokenizer.pad_id, tokenizer.bos_id])
        print(tokenizer.decode(ids + new), flush=True)


if __name__ == "__main__":
    main()
