"""Multi-process training with a synchronised batch norm in the box head (CPU, gloo)."""
import os
import re
import socket
import subprocess
import sys

from conftest import REPO


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_different_proposal_counts_finish_with_a_sync_bn_box_head():
    """Only the trainable pass may communicate: one forward and one backward collective of the norm
    on each rank, whatever the number of read-only chunks (which differs between the ranks here).
    Before the fix every chunk issued one, so the ranks' counts differed and the run hung until
    the gloo timeout."""
    done = subprocess.run([sys.executable, str(REPO / "tests" / "two_rank_syncbn.py"), str(free_port())],
                          capture_output=True, text=True, timeout=300, cwd=REPO / "tests",
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    counts = dict(re.findall(r"rank (\d): (\d+) collectives", done.stdout))
    assert counts == {"0": "2", "1": "2"}, done.stdout
