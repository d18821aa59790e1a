"""Consumers of the accepted corpus: the writer that drains the accepted and decision
topics into durable shards (``writer``) and the shard store it writes and the CLI
and report read (the ``store`` package). Imports the kernel only."""
