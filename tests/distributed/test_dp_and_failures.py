"""Data parallelism x DAP on one mesh, and failure handling: a rank that never joins, exits or
stalls makes the others fail within the stated timeout with a clear error (never a hang)."""
import pytest


def test_dp_x_dap_world_4(run_workers):
    results = run_workers("dp_x_dap", 4, {"dap_size": 2}, deadline=400)
    coords = sorted((r.records()[0]["dp_rank"], r.records()[0]["dap_rank"]) for r in results)
    assert coords == [(0, 0), (0, 1), (1, 0), (1, 1)]


TIMEOUT = 4.0
# the failing rank's error must arrive within the timeout plus this much (process start-up of
# the group, gloo's own connection handling)
SLACK = 20.0


def test_rank_that_never_joins(run_workers):
    results = run_workers("never_joins", 2, {"timeout": TIMEOUT}, deadline=120)
    (rec,) = results[0].records()
    print(f"never joins: {rec['error']} after {rec['elapsed']:.1f} s: {rec['message'][:300]}")
    assert rec["error"] == "DAPInitError"
    assert "did not form within 4 s" in rec["message"], rec["message"]
    assert rec["elapsed"] <= TIMEOUT + SLACK, rec


@pytest.mark.parametrize("mode", ["exit", "stall"])
def test_rank_that_dies_or_stalls(run_workers, mode):
    args = {"timeout": TIMEOUT, "mode": mode, "stall": TIMEOUT + 3}
    results = run_workers("peer_fails", 2, args, deadline=120)
    (rec,) = results[0].records()
    print(f"{mode}: {rec['error']} after {rec['elapsed']:.1f} s: {rec['message'][:300]}")
    assert rec["error"] == "DAPCommError", rec
    assert "DAP" in rec["message"] and "timeout" in rec["message"], rec["message"]
    assert rec["elapsed"] <= TIMEOUT + SLACK, rec
