"""Multi-process launcher for the DAP tests (CPU, gloo).

Each test starts `nprocs` Python processes running ``workers.py <scenario>`` with the
torch.distributed environment variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), waits for all of them with a deadline, and fails with every rank's
output if any rank fails. Processes still running at the deadline are killed (only the ones this
launcher started) and the test fails: a hang never blocks the suite.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

WORKER = Path(__file__).resolve().parent / "workers.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankResult:
    def __init__(self, rank: int, returncode: Optional[int], stdout: str, stderr: str,
                 elapsed: float):
        self.rank, self.returncode, self.stdout, self.stderr = rank, returncode, stdout, stderr
        self.elapsed = elapsed

    def records(self) -> List[dict]:
        """JSON lines the worker printed with the RESULT prefix."""
        return [json.loads(line[len("RESULT "):]) for line in self.stdout.splitlines()
                if line.startswith("RESULT ")]


def _report(results: List[RankResult]) -> str:
    parts = []
    for r in results:
        parts.append(f"--- rank {r.rank}: exit {r.returncode}, {r.elapsed:.1f} s\n"
                     f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-6000:]}")
    return "\n".join(parts)


def launch(scenario: str, nprocs: int, args: Optional[dict] = None, deadline: float = 240.0,
           expect_success: bool = True, script: Optional[Path] = None,
           extra_argv: Optional[List[str]] = None,
           env_per_rank: Optional[Dict[int, Dict[str, str]]] = None) -> List[RankResult]:
    """Run `scenario` on `nprocs` ranks; return each rank's result (asserting success unless
    `expect_success` is False)."""
    port = free_port()
    procs = []
    start = time.monotonic()
    argv_tail = [scenario, json.dumps(args or {})] if script is None else list(extra_argv or [])
    for rank in range(nprocs):
        env = dict(os.environ)
        env.update(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.update((env_per_rank or {}).get(rank, {}))
        procs.append(subprocess.Popen(
            [sys.executable, str(script or WORKER)] + argv_tail,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results: List[Optional[RankResult]] = [None] * nprocs
    timed_out = False
    for rank, p in enumerate(procs):
        remaining = max(0.1, deadline - (time.monotonic() - start))
        try:
            out, err = p.communicate(timeout=remaining)
        except subprocess.TimeoutExpired:
            timed_out = True
            p.kill()
            out, err = p.communicate()
        results[rank] = RankResult(rank, p.returncode, out, err, time.monotonic() - start)
    if timed_out:
        pytest.fail(f"scenario {scenario!r} on {nprocs} ranks exceeded its {deadline:.0f} s "
                    f"deadline (a hang)\n" + _report(results))
    if expect_success and any(r.returncode != 0 for r in results):
        pytest.fail(f"scenario {scenario!r} failed on {nprocs} ranks\n" + _report(results))
    return results


@pytest.fixture
def run_workers():
    return launch


@pytest.fixture
def tcp_port() -> int:
    return free_port()
