"""Write the Chit-Chat Challenge corpus (PyPI `chitchat-dataset`, MIT: 7,168 conversations between
two people) as SFT chats in JSON lines, `{"messages": [{role, content}, ...]}`: the first speaker
is the user, the second the assistant, consecutive messages of one speaker joined into one turn;
the first `--chats` conversations, each cut to its first `--turns` turns (ending on the
assistant's). A second chat corpus for the exact-forward study (scripts/exact_forward_study.sh).

    python scripts/chitchat_jsonl.py OUT.jsonl [--chats 2000] [--turns 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--chats", type=int, default=2000)
    parser.add_argument("--turns", type=int, default=4)
    args = parser.parse_args()
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("chitchat_jsonl.py: error: pip install --no-deps chitchat-dataset==0.9.0 first")
    data = json.loads((Path(spec.submodule_search_locations[0]) / "dataset.json").read_text(encoding="utf-8"))
    written = 0
    with args.out.open("w", encoding="utf-8") as out:
        for conversation in data.values():
            turns = [" ".join(m["text"].strip() for m in group if m["text"].strip()) for group in conversation["messages"]]
            turns = [t for t in turns if t][: args.turns]
            turns = turns[: len(turns) // 2 * 2]  # end on the assistant's turn
            if not turns:
                continue
            roles = ["user", "assistant"] * (len(turns) // 2)
            out.write(json.dumps({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]}) + "\n")
            written += 1
            if written == args.chats:
                break
    print(f"{written} chats written to {args.out}")


if __name__ == "__main__":
    main()
