"""Tracing: routing capture hooks (`capture`), running a trace (`run`), the Parquet routing log and its
contract (`routing_log`), DuckDB queries (`queries`), token/word alignment (`align`) and a treebank's
gold columns (`gold`)."""
