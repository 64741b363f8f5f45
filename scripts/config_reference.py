"""Print, check or rewrite the README's config reference (generated from ``lorafed/config.py``).

python scripts/config_reference.py            # print it
python scripts/config_reference.py --write    # rewrite README.md between the markers
python scripts/config_reference.py --check    # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorafed.config_doc import config_reference, current_section, replace_section

README = Path(__file__).resolve().parents[1] / "README.md"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the section of README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when README.md's section differs")
    ap.add_argument("--readme", type=Path, default=README, help="the README to read or rewrite")
    args = ap.parse_args(argv)
    generated = config_reference()
    if args.write:
        args.readme.write_text(replace_section(args.readme.read_text(encoding="utf-8"), generated), encoding="utf-8")
        print(f"config reference written to {args.readme}")
        return 0
    if args.check:
        if current_section(args.readme.read_text(encoding="utf-8")) != generated:
            print(f"{args.readme}: config reference is out of date; run {Path(__file__).name} --write")
            return 1
        return 0
    sys.stdout.write(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
