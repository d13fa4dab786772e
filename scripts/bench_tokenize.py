"""Time tokenising a corpus (every split), as `lenx train` / `lenx eval` do it: corpus, tokenizer, token streams.

Run it twice against an empty cache to see cold and cached times:

    export LENX_CACHE=$(mktemp -d)
    for tok in byte bpe:4096; do for pass in cold cached; do
        python scripts/bench_tokenize.py --dataset stdlib --tokenizer $tok --label $pass; done; done
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="stdlib")
    ap.add_argument("--tokenizer", default="byte")
    ap.add_argument("--label", default="")
    args = ap.parse_args()

    from lenx.data import SPLITS, cache_dir, get_tokenizer, load_corpus, token_stream
    from lenx.hardware import this_cpu

    t0 = time.perf_counter()
    corpus = load_corpus(args.dataset)
    t1 = time.perf_counter()
    tok = get_tokenizer(args.tokenizer, args.dataset, progress=False)
    t2 = time.perf_counter()
    n = sum(len(token_stream(args.dataset, tok, s, progress=False)) for s in SPLITS if s in corpus.sources
            and len(corpus.sources[s]))
    t3 = time.perf_counter()
    n_bytes = sum(len(d.encode()) for docs in corpus.splits.values() for d in docs)
    print(f"{args.dataset} {args.tokenizer:>9} {args.label:>6}: corpus {t1 - t0:6.2f}s  tokenizer {t2 - t1:6.2f}s  "
          f"streams {t3 - t2:6.2f}s  total {t3 - t0:6.2f}s  | {n:,} tokens, {n_bytes / n:.2f} bytes/token "
          f"(cache {cache_dir()}; CPU {this_cpu().describe()})")


if __name__ == "__main__":
    main()
