"""Per-client training script: one company's round on its own data file.

A thin wrapper around ``lorafed client train`` for sites that schedule a script rather than a
command, e.g.::

    python scripts/client_train.py --config configs/clothing_recommend.yaml --data mine.csv \
        --client-id shopA --global global_r3.safetensors --out update.safetensors

Every option of ``lorafed client train --help`` is accepted.
"""

from __future__ import annotations

import sys

from lorafed.cli import main

if __name__ == "__main__":
    sys.exit(main(["client", "train", *sys.argv[1:]]))
