"""``python -m fastcal demo`` (also installed as the ``fastcal`` command)."""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fastcal demo [--out DIR] [--seed N] [--device DEV] [--steps N] [--quiet]")
        return 0 if argv else 2
    if argv[0] != "demo":
        print(f"fastcal: unknown command {argv[0]!r} (the command is 'demo')", file=sys.stderr)
        return 2
    from .demo import main as demo_main

    return demo_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
