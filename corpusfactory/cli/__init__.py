"""The roof: the ``corpusfactory`` command line (argparse only).

``main`` builds the parser and dispatches; ``training``, ``serving``, ``ingest`` and
``report`` add their commands to it; ``common`` holds the shared flags. Each command
imports its stage or tool inside the function, so ``--help`` stays instant. May
import anything; nothing imports it (``make check`` enforces that).
"""
