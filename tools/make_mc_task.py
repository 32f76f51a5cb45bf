"""Writes the project's own offline multiple-choice task (`workbench/tasks/pydoc_cloze.*`).

Sentence completion on the *evaluation* part of the offline corpus: the context is the first part of a
prose sentence, the choices are its true ending and the endings of three other sentences of similar
length. A language model scores above chance (25 %) by how well it models the text. Run once; the
output is committed so the task never changes under a result.
"""
import json
import random
import re
from pathlib import Path

from workbench.data.text import load_text

OUT = Path(__file__).resolve().parents[1] / "workbench" / "tasks"
N_ITEMS = 240
SEED = 0


def sentences(text: str) -> list[list[str]]:
    out = []
    for para in text.split("\n\n"):
        if para.startswith((" ", "\t")) or ">>>" in para:  # code and grammar blocks are not prose
            continue
        flat = " ".join(para.split())
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            words = s.split()
            if 10 <= len(words) <= 30 and s.endswith(".") and not re.search(r"[{}\[\]=<>|]", s):
                out.append(words)
    return out


def main():
    rng = random.Random(SEED)
    pool = sentences(load_text("pydoc", "evaluation"))
    rng.shuffle(pool)
    split = lambda w: (" ".join(w[: int(len(w) * 0.6)]), " ".join(w[int(len(w) * 0.6):]))  # noqa: E731
    items, seen = [], set()
    for words in pool:
        context, ending = split(words)
        if context in seen:
            continue
        seen.add(context)
        n = len(ending.split())
        others = [split(w)[1] for w in pool if w is not words and abs(len(split(w)[1].split()) - n) <= 2]
        others = [o for o in dict.fromkeys(others) if o != ending]
        if len(others) < 3:
            continue
        choices = rng.sample(others, 3)
        label = rng.randrange(4)
        choices.insert(label, ending)
        items.append(dict(context=context, choices=choices, label=label))
        if len(items) == N_ITEMS:
            break
    OUT.mkdir(exist_ok=True)
    (OUT / "pydoc_cloze.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    print(f"wrote {len(items)} items to {OUT / 'pydoc_cloze.jsonl'}")


if __name__ == "__main__":
    main()
