"""`timm-bcos` command line: a thin layer over the library.

    timm-bcos coverage [--models NAME ...] [--out conversion/coverage.md]
    timm-bcos demo [--steps 300]
"""
from __future__ import annotations

import argparse
from typing import List, Optional

__all__ = ['main']


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog='timm-bcos', description='B-cos networks for timm')
    sub = parser.add_subparsers(dest='command', required=True)
    sub.add_parser('coverage', help='convert timm architectures and check Eq. 13 (writes a report)',
                   add_help=False)
    sub.add_parser('demo', help='train a small B-cos net on digits and check Eq. 13', add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == 'coverage':
        from .coverage import main as run
    else:
        from .demo import main as run
    run(rest)


if __name__ == '__main__':
    main()
