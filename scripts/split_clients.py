"""Write each client of a config's partition to its own CSV, to try the cross-silo workflow on one machine.

    python scripts/split_clients.py --config configs/clothing_recommend.yaml --out silo/data

Each file then stands for one company's data for ``lorafed client train`` (see the README,
"Federated across companies"). Overrides such as ``partition.num_clients=3`` may follow.
"""

from __future__ import annotations

import argparse
import sys

from lorafed.client.local import write_client_files
from lorafed.config import load_config
from lorafed.errors import LorafedError


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and write the files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--out", required=True, help="folder for CLIENT_ID.csv files")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    try:
        write_client_files(load_config(args.config, args.overrides), args.out)
    except LorafedError as exc:
        print(f"split_clients: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
