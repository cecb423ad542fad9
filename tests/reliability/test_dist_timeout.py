"""Distributed timeouts: with ``dist_timeout_s`` a stalled (SIGSTOP) rank ends the job with a clear message within
the timeout plus a margin, on gloo; train.py turns the collective's error into that message and a non-zero exit."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import libra_model.parallel.mesh as mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 3.0

WORKER = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    import torch.distributed as dist
    from libra_model.parallel.mesh import collective_failure_message, init_parallel

    parallel = init_parallel(int(os.environ["TP"]), timeout_s=float(os.environ["TIMEOUT_S"]))
    group = parallel.tp_group if parallel.tp > 1 else parallel.dp_group
    value = torch.ones(4)
    for _ in range(3):
        dist.all_reduce(value, group=group)
    if parallel.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # stalled: alive, holding its sockets, never answering
    print(f"stall {time.time()}", flush=True)
    try:
        dist.all_reduce(value, group=group)
        parallel.barrier()
    except Exception as error:
        message = collective_failure_message(error, float(os.environ["TIMEOUT_S"]))
        print(f"failed {time.time()}", flush=True)
        print(message if message is not None else f"UNRECOGNISED {error!r}", file=sys.stderr, flush=True)
        os._exit(1)
    print("no timeout", flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("tp", [2, 1])
def test_stalled_rank_ends_the_job_within_the_timeout(tp):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TP=str(tp), TIMEOUT_S=str(TIMEOUT_S),
                   OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        out, err = procs[0].communicate(timeout=120)  # start-up (imports, rendezvous) plus the timeout
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
    assert procs[0].returncode == 1, (out, err)
    times = dict(line.split() for line in out.splitlines() if line.split()[0] in ("stall", "failed"))
    waited = float(times["failed"]) - float(times["stall"])
    assert TIMEOUT_S * 0.9 <= waited <= TIMEOUT_S + 15, waited
    assert "rank 0: a collective did not complete within dist_timeout_s=3 s" in err, err
    assert "another rank stalled, died or lost its connection" in err and "UNRECOGNISED" not in err


def test_train_py_exits_with_the_message_on_a_collective_failure(tmp_path):
    script = textwrap.dedent("""
        import sys
        import train

        def stalled(config):
            raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 7000ms for recv")

        train.train = stalled
        sys.exit(train.main(["--dist-timeout", "7", "--output-dir", sys.argv[1]]))
    """)
    began = time.time()
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 1, result.stderr
    assert "a collective did not complete within dist_timeout_s=7 s" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.time() - began < 120


def test_other_errors_are_not_dressed_up():
    assert mesh.collective_failure_message(ValueError("TrainConfig: lr"), 5.0) is None
    assert mesh.collective_failure_message(RuntimeError("shape mismatch"), 5.0) is None
    assert "dist_timeout_s=5 s" in mesh.collective_failure_message(RuntimeError("Connection closed by peer"), 5.0)


def test_timeout_is_validated():
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        mesh.init_parallel(1, timeout_s=0)
