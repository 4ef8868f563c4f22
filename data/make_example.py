"""Write a small local example corpus for ``data=files`` from text already on this machine.

    python data/make_example.py [--out data/example] [--docs 40] [--format txt|jsonl]

Takes the first documents of the embedded corpus (Python standard library docstrings
and comments) and writes one .txt file per document (or one JSONL file), so
``mixtrain train data=files`` works offline with its default ``data.paths``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixtrain.config import DataConfig
from mixtrain.data.corpus import _iter_embedded_documents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "example"))
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--max-chars", type=int, default=DataConfig.embedded_max_chars)
    ap.add_argument("--format", choices=["txt", "jsonl"], default="txt")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = []
    for text in _iter_embedded_documents(args.max_chars):
        docs.append(text)
        if len(docs) == args.docs:
            break
    if args.format == "txt":
        for i, text in enumerate(docs):
            (out / f"doc{i:05d}.txt").write_text(text, encoding="utf-8")
    else:
        with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
            for text in docs:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    print(f"wrote {len(docs)} documents ({sum(map(len, docs))} characters) to {out}")


if __name__ == "__main__":
    main()
