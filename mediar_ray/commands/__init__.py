"""Sub-commands of ``mediar-ray``; each module exposes ``add_parser(subparsers)``."""
