"""``blossom-export``: turn a training run directory into a self-contained serving artifact.

    blossom-export --checkpoint runs/ml1m --out exports/ml1m --platforms cpu,cuda --top-k 20

The artifact (safetensors parameters, JSON config with the item-id mapping and versions, one serialized
``jax.export`` function per platform) is read by ``blossom_jax.serving.load`` without flax, optax or this
package's training code.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import jax

from blossom_jax.export import SUPPORTED_PLATFORMS, export_model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blossom-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory written by blossom-train")
    parser.add_argument("--out", required=True, help="export directory to create (must be empty or absent)")
    parser.add_argument("--platforms", default="cpu",
                        help=f"comma-separated subset of {','.join(SUPPORTED_PLATFORMS)} (default: cpu, which any host "
                             "serves on its CPU; add cuda / tpu to serve on the accelerator)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="input length N of the exported functions (default: the model's max_len)")
    parser.add_argument("--top-k", type=int, default=10, help="items returned per request (default: 10)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from train.checkpoint import load_run  # heavy (orbax, flax): only once arguments parsed

    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    run = load_run(args.checkpoint)
    params = jax.device_get(run.params)
    results_meta = {"source_run": str(args.checkpoint), "best_epoch": run.meta.get("best_epoch"),
                    "best_valid": run.meta.get("best_valid")}
    mapping = {raw: index for index, raw in enumerate(run.item_map.id_to_raw) if index}
    out = export_model(run.model_config, params, args.out, platforms=platforms, max_len=args.max_len,
                       top_k=args.top_k, item_mapping=mapping, extra=results_meta)
    print(json.dumps({"export": str(out), "platforms": platforms, "top_k": args.top_k,
                      "num_items": run.model_config.num_items}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
