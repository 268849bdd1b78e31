"""Build a tiny random Llama with a real fast tokenizer and ChatML template, offline.

    python scripts/make_tiny_model.py runs/tiny-model [--hidden 64 --layers 2 --vocab 512]
"""

from __future__ import annotations

import argparse

from lorakit.testing import build_tiny_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = build_tiny_llama(
        args.out_dir,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        seed=args.seed,
    )
    print(out)


if __name__ == "__main__":
    main()
