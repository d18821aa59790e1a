"""`python -m corpusfactory`: the command line (guarded: vLLM spawns worker processes)."""

from corpusfactory.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
