"""Translate a file (or stdin) with a trained run, and score BLEU when references are given.

    python scripts/translate.py outputs/RUN_DIR --input src.txt --references ref.txt
    echo "twenty-one" | python scripts/translate.py outputs/RUN_DIR/checkpoints/last.pt

A run directory is read as training resumes it (`last.pt`, else the newest readable step file), loaded safely,
and the file and step loaded go to stderr. Uses the Polyak-averaged parameters when the checkpoint has them
(`--last-iterate` for the raw ones).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import sacrebleu
import torch

from data import DataError
from trainer.checkpoint import CheckpointError
from trainer.tasks import decode_length
from trainer.trained import load_trained


@torch.no_grad()
def translate(model, tokenizer, lines: list[str], beam_size: int, length_penalty: float, batch_size: int,
              device: torch.device) -> list[str]:
    out = []
    for start in range(0, len(lines), batch_size):
        chunk = [tokenizer.encode(line) for line in lines[start:start + batch_size]]
        src = torch.full((len(chunk), max(len(ids) for ids in chunk) + 1), tokenizer.pad_id, dtype=torch.long)
        for row, ids in enumerate(chunk):
            src[row, :len(ids) + 1] = torch.tensor(ids + [tokenizer.eos_id])
        ids = model.generate(src.to(device), tokenizer.bos_id, tokenizer.eos_id, decode_length(src.shape[1]),
                             beam_size, length_penalty)
        out += [tokenizer.decode(h) for h in ids]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory or checkpoint file")
    parser.add_argument("--input", type=Path, help="source sentences, one a line (default: stdin)")
    parser.add_argument("--references", type=Path, help="reference translations, one a line: print BLEU")
    parser.add_argument("--output", type=Path, help="write translations here (default: stdout)")
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--last-iterate", action="store_true", help="the raw parameters, not the averaged ones")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    try:
        trained = load_trained(args.run, "transformer", last_iterate=args.last_iterate, device=device)
    except (CheckpointError, DataError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    print(trained.line, file=sys.stderr)
    model, tokenizer = trained.model, trained.task.tokenizer
    text = args.input.read_text() if args.input else sys.stdin.read()
    lines = text.splitlines()
    hypotheses = translate(model, tokenizer, lines, args.beam_size, args.length_penalty, args.batch_size, device)
    if args.output:
        args.output.write_text("".join(h + "\n" for h in hypotheses))
    else:
        print("\n".join(hypotheses))
    if args.references:
        references = args.references.read_text().splitlines()
        if len(references) != len(hypotheses):
            sys.exit(f"{len(references)} references for {len(hypotheses)} sources")
        print(f"BLEU {sacrebleu.corpus_bleu(hypotheses, [references]).score:.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()
