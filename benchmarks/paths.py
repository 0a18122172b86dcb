"""Where the benchmarks find the repository and the peer harness beside it (`../shared/bench/`).

Its own module so that run.py (the driver) and report.py (the table) share these without
importing each other.
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_DIR = os.path.join(os.path.dirname(REPO), "shared", "bench")
PEER_SCRIPT = os.path.join(PEER_DIR, "peer_hf.py")
SHIPPED_PEER = os.path.join(PEER_DIR, "results_peer_hf.jsonl")  # the peer's committed results
